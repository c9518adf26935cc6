//! Checking one transmission request against what was negotiated.
//!
//! A request that fails a check gets an NBD error reply and the connection
//! goes on (style rule 5: per-request errors are not connection errors);
//! only a bad magic ends a connection, and that is decided in
//! [`crate::connection`]. The order of checks follows the spec's guidance:
//! unknown command and unknown or misplaced flags are `EINVAL`; write-type
//! commands on a read-only export are `EPERM`; an out-of-range read, trim,
//! cache or block status is `EINVAL` while an out-of-range write or write
//! zeroes is `ENOSPC`; a payload longer than the maximum is `EINVAL`.

use crate::proto::{self, Errno, RequestHeader};

/// What the transmission phase negotiated, as the checks need it.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
    pub structured: bool,
    /// The id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<u32>,
    pub max_payload: u32,
}

impl Negotiated {
    fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

/// A request that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// A refused request: the error number and a message for the human.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub errno: Errno,
    pub message: &'static str,
}

fn refuse(errno: Errno, message: &'static str) -> Refusal {
    Refusal { errno, message }
}

/// Which command flags each command accepts (FUA is checked separately: it
/// is valid on every command once `SEND_FUA` was advertised).
fn allowed_flags(command: u16, n: &Negotiated) -> u16 {
    match command {
        proto::CMD_READ if n.has(proto::TF_SEND_DF) => proto::CMD_FLAG_DF,
        proto::CMD_WRITE_ZEROES => {
            let mut f = proto::CMD_FLAG_NO_HOLE;
            if n.has(proto::TF_SEND_FAST_ZERO) {
                f |= proto::CMD_FLAG_FAST_ZERO;
            }
            f
        }
        proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// Check `h` and turn it into a [`Command`].
pub fn check(h: &RequestHeader, n: &Negotiated) -> Result<Command, Refusal> {
    use proto::*;
    if !matches!(
        h.command,
        CMD_READ
            | CMD_WRITE
            | CMD_DISC
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    ) {
        return Err(refuse(Errno::Inval, "unknown command"));
    }
    let mut flags = h.flags;
    let fua = flags & CMD_FLAG_FUA != 0;
    if fua {
        if !n.has(TF_SEND_FUA) {
            return Err(refuse(Errno::Inval, "FUA flag was not negotiated"));
        }
        flags &= !CMD_FLAG_FUA;
    }
    if flags & !allowed_flags(h.command, n) != 0 {
        return Err(refuse(Errno::Inval, "flag not valid for this command"));
    }

    let read_only = n.has(TF_READ_ONLY);
    let is_write = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if is_write && read_only {
        return Err(refuse(Errno::Perm, "export is read-only"));
    }
    match h.command {
        CMD_TRIM if !n.has(TF_SEND_TRIM) => {
            return Err(refuse(Errno::Inval, "TRIM was not negotiated"));
        }
        CMD_WRITE_ZEROES if !n.has(TF_SEND_WRITE_ZEROES) => {
            return Err(refuse(Errno::Inval, "WRITE_ZEROES was not negotiated"));
        }
        CMD_FLUSH if !n.has(TF_SEND_FLUSH) => {
            return Err(refuse(Errno::Inval, "FLUSH was not negotiated"));
        }
        CMD_FLUSH if h.offset != 0 || h.length != 0 => {
            return Err(refuse(Errno::Inval, "FLUSH offset and length must be zero"));
        }
        CMD_BLOCK_STATUS if n.base_allocation.is_none() => {
            return Err(refuse(
                Errno::Inval,
                "BLOCK_STATUS without a negotiated metadata context",
            ));
        }
        CMD_BLOCK_STATUS if h.length == 0 => {
            return Err(refuse(Errno::Inval, "BLOCK_STATUS of zero length"));
        }
        CMD_READ | CMD_WRITE if h.length > n.max_payload => {
            return Err(refuse(
                Errno::Inval,
                "request is larger than the maximum payload",
            ));
        }
        _ => {}
    }

    let in_range = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|end| end <= n.size);
    if !in_range && !matches!(h.command, CMD_DISC | CMD_FLUSH) {
        return Err(match h.command {
            CMD_WRITE | CMD_WRITE_ZEROES => {
                refuse(Errno::NoSpc, "request extends past the end of the export")
            }
            _ => refuse(Errno::Inval, "request extends past the end of the export"),
        });
    }

    let (offset, len) = (h.offset, h.length);
    Ok(match h.command {
        CMD_READ => Command::Read {
            offset,
            len,
            df: flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_DISC => Command::Disc,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole: flags & CMD_FLAG_NO_HOLE != 0,
            fast: flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            len,
            req_one: flags & CMD_FLAG_REQ_ONE != 0,
        },
        _ => unreachable!("command was checked above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;

    fn writable() -> Negotiated {
        Negotiated {
            size: 1 << 20,
            transmission_flags: TF_HAS_FLAGS
                | TF_SEND_FLUSH
                | TF_SEND_FUA
                | TF_SEND_TRIM
                | TF_SEND_WRITE_ZEROES
                | TF_SEND_FAST_ZERO
                | TF_SEND_DF,
            structured: true,
            base_allocation: Some(1),
            max_payload: MAX_PAYLOAD,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    fn errno(r: Result<Command, Refusal>) -> Errno {
        r.expect_err("request should be refused").errno
    }

    #[test]
    fn past_the_end_read_trim_and_status_are_einval() {
        let n = writable();
        for cmd in [CMD_READ, CMD_TRIM, CMD_BLOCK_STATUS, CMD_CACHE] {
            assert_eq!(
                errno(check(&req(cmd, 0, (1 << 20) - 1, 2), &n)),
                Errno::Inval
            );
        }
    }

    #[test]
    fn past_the_end_write_and_write_zeroes_are_enospc() {
        let n = writable();
        for cmd in [CMD_WRITE, CMD_WRITE_ZEROES] {
            assert_eq!(errno(check(&req(cmd, 0, 1 << 20, 1), &n)), Errno::NoSpc);
        }
    }

    #[test]
    fn offset_overflow_is_out_of_range_not_a_wraparound() {
        let n = writable();
        assert_eq!(
            errno(check(&req(CMD_READ, 0, u64::MAX, 2), &n)),
            Errno::Inval
        );
    }

    #[test]
    fn writes_on_read_only_export_are_eperm() {
        let mut n = writable();
        n.transmission_flags |= TF_READ_ONLY;
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(errno(check(&req(cmd, 0, 0, 512), &n)), Errno::Perm);
        }
        assert!(check(&req(CMD_READ, 0, 0, 512), &n).is_ok());
    }

    #[test]
    fn zero_length_requests_are_accepted_except_block_status() {
        let n = writable();
        for cmd in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
            assert!(check(&req(cmd, 0, 4096, 0), &n).is_ok(), "cmd {cmd}");
        }
        assert_eq!(
            errno(check(&req(CMD_BLOCK_STATUS, 0, 0, 0), &n)),
            Errno::Inval
        );
    }

    #[test]
    fn unknown_command_and_flags_are_einval() {
        let n = writable();
        assert_eq!(errno(check(&req(99, 0, 0, 0), &n)), Errno::Inval);
        assert_eq!(errno(check(&req(CMD_READ, 1 << 9, 0, 1), &n)), Errno::Inval);
        assert_eq!(
            errno(check(&req(CMD_WRITE, CMD_FLAG_REQ_ONE, 0, 1), &n)),
            Errno::Inval
        );
    }

    #[test]
    fn fua_is_accepted_on_any_command_once_negotiated() {
        let n = writable();
        assert!(check(&req(CMD_READ, CMD_FLAG_FUA, 0, 1), &n).is_ok());
        let mut no_fua = n;
        no_fua.transmission_flags &= !TF_SEND_FUA;
        assert_eq!(
            errno(check(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &no_fua)),
            Errno::Inval
        );
    }

    #[test]
    fn oversized_read_is_einval_but_oversized_trim_is_served() {
        let mut n = writable();
        n.size = 1 << 40;
        assert_eq!(
            errno(check(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &n)),
            Errno::Inval
        );
        assert!(check(&req(CMD_TRIM, 0, 0, u32::MAX), &n).is_ok());
        assert!(check(&req(CMD_WRITE_ZEROES, 0, 0, 64 << 20), &n).is_ok());
    }

    #[test]
    fn block_status_needs_a_metadata_context() {
        let mut n = writable();
        n.base_allocation = None;
        assert_eq!(
            errno(check(&req(CMD_BLOCK_STATUS, 0, 0, 512), &n)),
            Errno::Inval
        );
    }

    #[test]
    fn df_is_only_valid_when_advertised() {
        let mut n = writable();
        assert!(check(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &n).is_ok());
        n.transmission_flags &= !TF_SEND_DF;
        assert_eq!(
            errno(check(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &n)),
            Errno::Inval
        );
    }
}
