//! Operating a cutover from a script: JSON documents validated against the
//! published schemas, the metrics endpoint scraped and parsed, and
//! `stream` commands run against one run directory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::binary;
use crate::tool;

/// `docs/schema/NAME.json`, compiled. Panics if the schema itself is bad.
pub fn schema(name: &str) -> jsonschema::Validator {
    let path = binary::workspace_root()
        .join("docs/schema")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read schema {}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    jsonschema::validator_for(&value)
        .unwrap_or_else(|e| panic!("{} is not a valid JSON Schema: {e}", path.display()))
}

/// Parse `text` as one JSON document and check it against schema `name`.
pub fn assert_valid(name: &str, text: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {text:?}"));
    let errors: Vec<String> = schema(name)
        .iter_errors(&v)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{v}\ndoes not follow docs/schema/{name}.json:\n{}",
        errors.join("\n")
    );
    v
}

/// `stream ARGS --run-dir RUN`, ready to run.
pub fn stream(run_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary::stream_bin());
    cmd.args(args).arg("--run-dir").arg(run_dir);
    cmd
}

/// A process spawned by a test, its stdout read line by line; killed
/// (SIGKILL, by pid) and reaped on drop.
pub struct Spawned {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Spawned {
    /// Spawn `cmd` with stderr to `stderr_log`.
    pub fn new(mut cmd: Command, stderr_log: &Path) -> Spawned {
        let log = std::fs::File::create(stderr_log).expect("stderr log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Spawned {
            child,
            lines,
            stderr: stderr_log.to_path_buf(),
        }
    }

    /// The next stdout line, within `timeout`; panics with stderr otherwise.
    pub fn line(&self, timeout: Duration) -> String {
        self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!(
                "no line on stdout within {timeout:?} ({e}); stderr:\n{}",
                self.stderr()
            )
        })
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait for the exit within `timeout`; panics if it runs on.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tool::wait_deadline(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "still running after {timeout:?}; stderr:\n{}",
                self.stderr()
            )
        })
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        test_support::child::kill_and_reap(&mut self.child);
        if thread::panicking() {
            eprintln!("stderr of {}:\n{}", self.child.id(), self.stderr());
        }
    }
}

/// Poll `f` until it returns `Some`, at most `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// One sample of the exposition format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape: the samples and the declared `# TYPE` of each family.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub types: BTreeMap<String, String>,
    pub content_type: String,
}

impl Scrape {
    /// The value of the sample `name` with these labels (a subset match);
    /// panics when there is none or several.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one sample {name}{labels:?}, found {found:?}"
        );
        found[0].value
    }
}

/// GET http://ADDR/metrics over a plain TCP connection; parses every line.
pub fn scrape(addr: &str) -> Scrape {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the metrics reply");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end in {raw:?}"));
    let mut head_lines = head.lines();
    let status = head_lines.next().unwrap_or_default();
    assert!(status.contains(" 200 "), "metrics answered {status:?}");
    let mut scrape = Scrape::default();
    for h in head_lines {
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-type") {
                scrape.content_type = v.trim().to_string();
            }
            if k.eq_ignore_ascii_case("content-length") {
                assert_eq!(v.trim().parse::<usize>().ok(), Some(body.len()), "{head}");
            }
        }
    }
    parse_exposition(body, &mut scrape);
    scrape
}

/// The Prometheus text format 0.0.4, strictly: `# HELP`/`# TYPE` lines, then
/// `name{label="value",...} number` samples. Panics on any other line.
pub fn parse_exposition(body: &str, out: &mut Scrape) {
    assert!(body.ends_with('\n'), "exposition must end with a newline");
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "unknown type in {line:?}"
            );
            assert!(
                out.types.insert(name.into(), kind.into()).is_none(),
                "{name} typed twice"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment line {line:?}");
        out.samples.push(parse_sample(line));
    }
    for s in &out.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                s.name
                    .strip_suffix(suf)
                    .filter(|f| out.types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&s.name);
        assert!(
            out.types.contains_key(family),
            "sample {} has no # TYPE",
            s.name
        );
    }
}

fn parse_sample(line: &str) -> Sample {
    let bad = |why: &str| -> ! { panic!("bad sample line ({why}): {line:?}") };
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or_else(|| bad("no value"));
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        bad("metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = r.find('=').unwrap_or_else(|| bad("label without ="));
            let key = &r[..eq];
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bad("label name");
            }
            r = r[eq + 1..]
                .strip_prefix('"')
                .unwrap_or_else(|| bad("label value not quoted"));
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => bad("escape"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => bad("unterminated label value"),
                }
            };
            labels.insert(key.to_string(), value);
            r = &r[end + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| bad("no space before the value"));
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| bad("value is not a number")),
    };
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

/// The run directory entry `RUN/ID.json`, once it exists.
pub fn run_entry(run_dir: &Path, id: &str, timeout: Duration) -> serde_json::Value {
    let path = run_dir.join(format!("{id}.json"));
    poll(&format!("{}", path.display()), timeout, || {
        let text = std::fs::read_to_string(&path).ok()?;
        serde_json::from_str(&text).ok()
    })
}

/// True when `text` holds no terminal escape sequence (colour, cursor moves).
pub fn is_plain(text: &str) -> bool {
    !text.contains('\u{1b}')
}
