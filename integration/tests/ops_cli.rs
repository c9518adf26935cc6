//! What an operator installs and reads: `--help` of every command against
//! the flags docs/operations.md documents, shell completion scripts, the
//! systemd unit (checked by systemd-analyze) and its readiness protocol.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use integration::image::{MIB, dense_file};
use integration::ops::{Spawned, stream};
use integration::{binary, tool};

const T: Duration = Duration::from_secs(30);

/// The "Flags by command" table of docs/operations.md: (command, flags).
fn documented_flags() -> Vec<(Vec<String>, Vec<String>)> {
    let path = binary::workspace_root().join("docs/operations.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let section = text
        .split("## Flags by command")
        .nth(1)
        .expect("docs/operations.md has a 'Flags by command' section");
    let rows: Vec<_> = section
        .lines()
        .filter(|l| l.starts_with("| `stream"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let words = |s: &str| -> Vec<String> {
                s.split(',')
                    .map(|w| w.trim().trim_matches('`').to_string())
                    .filter(|w| !w.is_empty())
                    .collect()
            };
            let cmd: Vec<String> = cells[1]
                .trim_matches('`')
                .split_whitespace()
                .skip(1)
                .map(String::from)
                .collect();
            (cmd, words(cells[2]))
        })
        .collect();
    assert!(rows.len() >= 8, "the flags table is incomplete: {rows:?}");
    rows
}

#[test]
fn every_documented_flag_is_in_the_help_of_its_command() {
    let run = tempfile::tempdir().unwrap();
    let mut commands_seen = Vec::new();
    for (cmd, flags) in documented_flags() {
        let mut args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        args.push("--help");
        let out = tool::run_ok(&mut stream(run.path(), &args), T);
        let help = out.stdout_lossy();
        for flag in &flags {
            assert!(
                help.contains(flag.as_str()),
                "`stream {} --help` does not mention {flag}, which docs/operations.md documents:\n{help}",
                cmd.join(" ")
            );
        }
        if let Some(c) = cmd.first() {
            commands_seen.push(c.clone());
        }
    }
    // And the table leaves no command out.
    let top = tool::run_ok(&mut stream(run.path(), &["--help"]), T).stdout_lossy();
    let listed: Vec<&str> = top
        .split("Commands:")
        .nth(1)
        .expect("a Commands section")
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    for c in listed {
        assert!(
            commands_seen.iter().any(|s| s == c),
            "`stream {c}` is missing from the flags table of docs/operations.md"
        );
    }
    // The top-level help ends with a cutover to follow.
    let long = tool::run_ok(&mut stream(run.path(), &["--help"]), T).stdout_lossy();
    for step in [
        "stream export",
        "stream start",
        "stream status",
        "stream finalize",
    ] {
        assert!(long.contains(step), "--help does not show {step}: {long}");
    }
}

#[test]
fn completion_scripts_name_every_command() {
    let run = tempfile::tempdir().unwrap();
    let bash = tool::run_ok(&mut stream(run.path(), &["completions", "bash"]), T).stdout_lossy();
    for word in [
        "export",
        "start",
        "status",
        "finalize",
        "verify",
        "--metrics",
        "--run-dir",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    // bash itself accepts it and registers the completion function.
    let bash_bin = tool::require_tool("bash", "bash");
    let file = run.path().join("stream.bash");
    std::fs::write(&file, &bash).unwrap();
    let out = tool::run_ok(
        std::process::Command::new(bash_bin)
            .arg("-c")
            .arg(format!(". {} && complete -p stream", file.display())),
        T,
    );
    assert!(out.stdout_lossy().contains("stream"), "{}", out.describe());
    for shell in ["zsh", "fish"] {
        let s = tool::run_ok(&mut stream(run.path(), &["completions", shell]), T).stdout_lossy();
        assert!(
            s.contains("finalize") && s.contains("--json"),
            "{shell}: {s}"
        );
    }
    let out = tool::run(&mut stream(run.path(), &["completions", "tcsh"]), T);
    assert!(!out.status.success(), "{}", out.describe());
}

#[test]
fn the_systemd_unit_verifies_and_start_reports_ready() {
    let analyze = tool::require_tool("systemd-analyze", "systemd");
    let unit = binary::workspace_root().join("dist/systemd/stream@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for key in [
        "Type=notify",
        "EnvironmentFile=/etc/stream/%i.env",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "RuntimeDirectory=stream",
        "--id %i",
    ] {
        assert!(text.contains(key), "stream@.service lacks {key}");
    }
    // systemd-analyze checks an instance of it, with ExecStart pointing at
    // the binary under test (it checks that the program exists).
    let dir = tempfile::tempdir().unwrap();
    let instance = dir.path().join("stream@db01.service");
    std::fs::write(
        &instance,
        text.replace(
            "/usr/local/bin/stream",
            binary::stream_bin().to_str().unwrap(),
        ),
    )
    .unwrap();
    let out = tool::run(
        std::process::Command::new(analyze)
            .arg("verify")
            .arg(&instance)
            .env("SYSTEMD_LOG_LEVEL", "warning"),
        T,
    );
    assert!(
        out.status.success() && !out.stderr_lossy().contains("stream@db01"),
        "systemd-analyze verify: {}",
        out.describe()
    );

    // Type=notify: READY=1 arrives once the export serves.
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let source = dir.path().join("legacy.img");
    dense_file(&source, MIB, 3);
    let run = dir.path().join("run");
    let mut cmd = stream(
        &run,
        &[
            "start",
            "--id",
            "db01",
            "--source",
            source.to_str().unwrap(),
            "--target",
            dir.path().join("t.raw").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    cmd.env("NOTIFY_SOCKET", &notify);
    let mut start = Spawned::new(cmd, &dir.path().join("start.log"));
    let uri = start.line(T);
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no notification within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        msg.lines().any(|l| l == "READY=1") && msg.contains(&uri),
        "{msg:?}"
    );
    start.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("no STOPPING notification");
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(start.wait(T).success(), "{}", start.stderr());
}
