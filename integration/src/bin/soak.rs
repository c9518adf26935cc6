//! `cargo run -p integration --bin soak -- --minutes 10 [--size-mib 64]
//! [--seed N] [--dir DIR]`: the soak of [`integration::soak`], for as long
//! as asked; prints its report as one JSON line and exits 0, or panics
//! (non-zero) at the first loss.

use std::time::Duration;

use integration::soak::{Options, run};

fn main() {
    let mut opts = Options::new(Duration::from_secs(600));
    let mut dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next().unwrap_or_else(|| {
                panic!("{a} needs a value; see the doc of integration/src/bin/soak.rs")
            })
        };
        match a.as_str() {
            "--minutes" => {
                let m: f64 = value().parse().expect("--minutes takes a number");
                opts.duration = Duration::from_secs_f64(m * 60.0);
            }
            "--size-mib" => {
                opts.size = value().parse::<u64>().expect("--size-mib takes a number") << 20
            }
            "--seed" => opts.seed = value().parse().expect("--seed takes a number"),
            "--dir" => dir = Some(std::path::PathBuf::from(value())),
            other => {
                eprintln!(
                    "soak: unknown argument {other:?}; use --minutes, --size-mib, --seed, --dir"
                );
                std::process::exit(2);
            }
        }
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).expect("soak dir");
    let report = run(&dir, &opts);
    println!("{}", report.json());
}
