//! The `main` every one-report bench binary shares: arguments or usage
//! (exit 2), the `stream` binary it runs built or named, then the report
//! on stdout or the error on stderr.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Run `bench`: `parsed` is its arguments (an empty error asks for the
/// usage only), `stream_bin` the binary it will run, `run` the bench.
pub fn run<O>(
    bench: &str,
    usage: &str,
    parsed: Result<O, String>,
    stream_bin: impl Fn(&O) -> &Path,
    run: impl FnOnce(&O) -> io::Result<String>,
) -> ExitCode {
    let opts = match parsed {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{bench}: {e}");
            }
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    let bin = stream_bin(&opts);
    if !bin.is_file() {
        eprintln!(
            "{bench}: {} not found: run `cargo build --release -p stream-cli --bin stream` \
             first (or pass --stream-bin)",
            bin.display()
        );
        return ExitCode::from(2);
    }
    match run(&opts) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{bench}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace's target directory, where the benches find the release
/// `stream` and keep their scratch: `CARGO_TARGET_DIR`, or `target/` of
/// the repository.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}
