//! Opening a volume: a new migration or a resumed one (its identity
//! checked against the state), and crash recovery after an unclean stop
//! (see the module docs of `volume`).

use super::*;

/// How to open a volume.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub target: PathBuf,
    pub state_dir: PathBuf,
    /// Required to match an existing state; the default for a new one.
    pub chunk_size: Option<u64>,
    /// Open a finalized migration too (for `stream verify`; never to serve).
    /// Its target belongs to the new instance: it is opened read-only, never
    /// marked running, recovered or replayed onto ([`Volume::read_only`]).
    pub allow_finalized: bool,
    /// Opened to serve clients (`stream start`), not to finish or check it.
    pub serving: bool,
    /// An already open target (tests: in-memory or fault-injecting
    /// backends); `target` then only names it.
    pub target_device: Option<Target>,
    /// The source is the same disk but its content may have changed since
    /// chunks were copied (a seeded migration before its cutover): its
    /// fingerprint is taken afresh instead of compared, and the delta
    /// (`Volume::changed_chunks`) finds what changed.
    pub source_may_differ: bool,
}

/// The target `opts` names: the one given, or the file or device opened
/// (and created, if `may_create`) at `opts.target`.
fn open_target(opts: &OpenOptions, size: u64, may_create: bool) -> Result<(Target, bool)> {
    match &opts.target_device {
        Some(t) if t.size() < size => Err(Error::Invalid(format!(
            "target {} holds {} bytes but the source has {size}",
            t.path().display(),
            t.size()
        ))),
        Some(t) => Ok((t.clone(), false)),
        None => Target::open(&opts.target, size, may_create),
    }
}

impl<S: Source> Volume<S> {
    /// Before serving: a migration whose `stream finalize` was interrupted
    /// is streaming again, and what that finalize proved no longer holds
    /// (clients may write).
    pub fn serve_again(&self) -> Result<()> {
        if self.header().phase != Phase::Finalizing {
            return Ok(());
        }
        self.update_header(|h| {
            h.phase = Phase::Streaming;
            if let Some(f) = h.finalize.as_mut() {
                f.manifest_written = false;
                f.verified = false;
            }
        })?;
        tracing::warn!(
            "an interrupted `stream finalize` is undone: the volume is served again and \
             clients may write, so run finalize again when the instance is ready to switch"
        );
        Ok(())
    }

    /// Create or resume the migration in `opts.state_dir`.
    pub async fn open(source: S, opts: &OpenOptions) -> Result<Arc<Volume<S>>> {
        let sid = source.id();
        // The legacy disk is only ever read: refuse a target that is the
        // source under another name (an NBD source names nothing local).
        if sid.kind == "file" {
            crate::target::identity::check_distinct(Path::new(&sid.location), &opts.target)?;
        }
        let (state, header, map, target, read_only) = if StateDir::exists(&opts.state_dir) {
            let (state, header, map) = StateDir::open(&opts.state_dir)?;
            if header.phase == Phase::Finalized && !opts.allow_finalized {
                return Err(Error::Finalized {
                    dir: opts.state_dir.clone(),
                });
            }
            let cinder = header.finalize.as_ref().and_then(|f| f.cinder.as_ref());
            if let Some(c) = cinder
                && opts.serving
            {
                return Err(Error::Invalid(format!(
                    "finalize already handed the target to Cinder ({}); run `stream finalize` \
                     again to complete it instead of serving the volume",
                    c.volume_id.as_deref().unwrap_or("manage call in progress")
                )));
            }
            if let Some(cs) = opts.chunk_size.filter(|&cs| cs != header.chunk_size) {
                return Err(Error::Mismatch {
                    what: "chunk size",
                    recorded: header.chunk_size.to_string(),
                    given: cs.to_string(),
                });
            }
            if (sid.kind.as_str(), sid.location.as_str())
                != (header.source.kind.as_str(), header.source.location.as_str())
            {
                return Err(Error::Mismatch {
                    what: "source",
                    recorded: header.source.location.clone(),
                    given: sid.location.clone(),
                });
            }
            if sid.size != header.source.size {
                return Err(Error::Mismatch {
                    what: "source size",
                    recorded: header.source.size.to_string(),
                    given: sid.size.to_string(),
                });
            }
            // A finalized target belongs to the new instance: nothing here
            // may write to it again, so it is not even opened for writing.
            let read_only = header.phase == Phase::Finalized;
            let target = if read_only && opts.target_device.is_none() {
                Target::open_read_only(&opts.target, header.size)?
            } else {
                open_target(opts, header.size, false)?.0
            };
            let tid = target.id(header.target.created_sparse);
            let same_target = tid.path == header.target.path
                && tid.kind == header.target.kind
                && (tid.dev, tid.ino) == (header.target.dev, header.target.ino);
            if !same_target {
                return Err(Error::Mismatch {
                    what: "target",
                    recorded: format!(
                        "{} ({} dev {} inode {})",
                        header.target.path,
                        header.target.kind,
                        header.target.dev,
                        header.target.ino
                    ),
                    given: format!(
                        "{} ({} dev {} inode {})",
                        tid.path, tid.kind, tid.dev, tid.ino
                    ),
                });
            }
            // The target's marker names the migration that last took it:
            // another one (`stream start --overwrite-target` with another
            // state) means this state describes a target that is gone.
            match crate::target::identity::read_marker(&opts.target) {
                Ok(Some((m, place)))
                    if !m.migration.is_empty()
                        && header
                            .migration_id
                            .as_ref()
                            .is_some_and(|id| *id != m.migration) =>
                {
                    return Err(Error::Invalid(format!(
                        "the target {} was taken over by another migration since this one \
                         last ran (its {place} names state {}, source {}, phase {}): this \
                         state no longer describes it, and resuming would write over that \
                         migration. Use that migration's state, or give this one another target",
                        opts.target.display(),
                        m.state_dir,
                        m.source,
                        m.phase
                    )));
                }
                Ok(None) if opts.serving => state.mark_target(&header),
                _ => {}
            }
            (state, header, map, target, read_only)
        } else {
            let geometry = Geometry::new(sid.size, opts.chunk_size.unwrap_or(DEFAULT_CHUNK))
                .map_err(Error::Invalid)?;
            if geometry.size() == 0 {
                return Err(Error::Invalid("the source is empty (0 bytes)".into()));
            }
            let (target, created) = open_target(opts, sid.size, true)?;
            let header = Header {
                format: state::FORMAT.into(),
                version: state::VERSION,
                source: sid.clone(),
                target: target.id(created),
                size: sid.size,
                chunk_size: geometry.chunk_size(),
                phase: Phase::Streaming,
                created_at: now_secs(),
                finalized_at: None,
                finalize: None,
                migration_id: Some(state::new_migration_id(&opts.state_dir)),
                detach: None,
                seed: None,
            };
            let (state, map) = StateDir::create(&opts.state_dir, &header)?;
            Fingerprint::discard(&opts.state_dir)?;
            (state, header, map, target, false)
        };
        // The source must still be the disk the chunks came from. A
        // finalized migration fetches nothing (verify compares instead), so
        // its source is not sampled: that would read chunks over the link
        // that the comparison then reads or hashes anyway.
        if opts.source_may_differ && !read_only {
            Fingerprint::discard(&opts.state_dir)?;
        }
        let fingerprint = Arc::new(Fingerprint::load(&opts.state_dir, header.geometry())?);
        if !read_only {
            source
                .install_fingerprint(fingerprint.clone())
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?;
        }
        // Read-only: no running marker, so no recovery and no replay, ever.
        let unclean = !read_only && state.mark_running()?;
        let state_io = |source| Error::StateIo {
            dir: opts.state_dir.clone(),
            source,
        };
        let mut replayed = Vec::new();
        // Shared with a guest that may write it directly (`detach`): the log
        // is empty by construction, and replaying anything now could put
        // back bytes the guest has written over since.
        let shared = header.detach.is_some();
        if read_only {
            // Leave every file as it is: nothing is replayed onto the target.
        } else if unclean && !shared {
            // Make every logged in-place change whole before anything else
            // looks at the target.
            let (n, touched) = wal::replay(&opts.state_dir, &target)
                .await
                .map_err(state_io)?;
            if n > 0 {
                tracing::warn!(
                    "replayed {n} logged in-place changes cut short by the unclean stop"
                );
            }
            replayed = touched;
        } else {
            wal::remove_all(&opts.state_dir).map_err(state_io)?;
        }
        let wal = Wal::open(&opts.state_dir, !read_only).map_err(state_io)?;
        // The kept manifest: chunk records, stale where clients changed
        // chunks in place (replayed changes included: the map may not know
        // of their writes).
        let hashes = if read_only {
            None
        } else {
            let h = ChunkHashes::open(&opts.state_dir, &map, !unclean).map_err(state_io)?;
            let g = header.geometry();
            for (offset, len) in replayed {
                for i in g.chunks_of(offset, len.max(1)) {
                    h.mark_dirty(ChunkIndex(i));
                }
            }
            if unclean && shared {
                // Which chunks the guest wrote (through us, unlogged, or
                // directly) is not known after a crash: none is trusted.
                for i in 0..g.chunks() {
                    h.mark_dirty(ChunkIndex(i));
                }
            }
            Some(Arc::new(h))
        };
        // A seeded cutover's candidates, while any is still absent; once
        // every one is present the set means nothing, and is dropped
        // rather than loaded and counted at every start.
        let candidates = std::sync::OnceLock::new();
        if !read_only {
            if let Some((bits, zero)) = state.read_candidates(header.geometry().chunks())? {
                if super::candidate::absent_among(&bits, &map) == 0 {
                    state.remove_candidates()?;
                } else {
                    let _ = candidates.set(super::candidate::Candidates::new(
                        bits,
                        zero,
                        header.chunk_size,
                        &map,
                    ));
                }
            }
        }
        let prefetch = Prefetch::new(header.chunk_size);
        let volume = Arc::new(Volume {
            geometry: header.geometry(),
            source,
            target,
            map,
            locks: Arc::new(ChunkLocks::default()),
            state: Arc::new(state),
            sparse_target: header.target.created_sparse,
            header: Mutex::new(header),
            persist: tokio::sync::Mutex::new(()),
            wal,
            stats: Stats::default(),
            fg_active: AtomicUsize::new(0),
            fg_last: AtomicU64::new(0),
            readahead: Mutex::new(Readahead::default()),
            prefetch,
            readahead_alive: Arc::new((AtomicUsize::new(0), tokio::sync::Notify::new())),
            requests: Arc::new(Requests::default()),
            cache_slots: tokio::sync::Semaphore::new(CACHE_SLOTS),
            opened: Instant::now(),
            fingerprint,
            read_only,
            hashes,
            shared_target: std::sync::atomic::AtomicBool::new(shared),
            candidates,
        });
        volume.stats.resume(&volume.state.load_totals());
        if unclean {
            volume.recover().await?;
        }
        Ok(volume)
    }

    /// Make the map consistent with the target after an unclean stop (see
    /// the module docs), and persist the result.
    pub(super) async fn recover(&self) -> Result<()> {
        let target = self.target.clone();
        let size = self.geometry.size();
        let extents = tokio::task::spawn_blocking(move || target.data_extents(0, size))
            .await
            .map_err(|e| Error::ReadTarget {
                offset: 0,
                source: std::io::Error::other(e),
            })?
            .map_err(|source| Error::ReadTarget { offset: 0, source })?;
        // A shared target is never cleared: data where the map says zero
        // may be the guest's, written directly (`detach`).
        let clear = self.sparse_target && !self.target_shared();
        let (mut punched, mut demoted) = (0u64, 0u64);
        for (s, e) in extents {
            for i in self.geometry.chunks_of(s, e - s) {
                let c = ChunkIndex(i);
                let r = self.geometry.bytes(c);
                match (self.map.state(c), clear) {
                    (ChunkState::Data, _) | (ChunkState::Absent, false) => {}
                    // An old copy, compared before it is used (`candidate`).
                    (ChunkState::Absent, true) if self.is_candidate(c) => {}
                    (ChunkState::Absent | ChunkState::Zero, true) => {
                        self.target
                            .zero(r.start, r.end - r.start, false)
                            .await
                            .map_err(|source| Error::WriteTarget { index: c, source })?;
                        punched += 1;
                    }
                    (ChunkState::Zero, false) => {
                        let written = self.map.is_written(c);
                        self.stale(r.start, r.end - r.start);
                        self.map.set(c, ChunkState::Data, false);
                        self.state.record(c, ChunkState::Data, written);
                        demoted += 1;
                    }
                }
            }
        }
        tracing::warn!(
            "{}: the last run did not stop cleanly; unflushed writes were dropped \
             ({punched} chunks of the target cleared to match the map, {demoted} zero chunks now read from the target)",
            self.state.path().display()
        );
        self.flush().await
    }
}
