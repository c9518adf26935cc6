//! Several migrations on one host: each `stream start` registers in the
//! common run directory; `stream status` with no argument lists them all,
//! a killed one as "not running"; on a terminal, `--watch` draws a bar.

use std::time::Duration;

use integration::image::{MIB, dense_file};
use integration::ops::{assert_valid, is_plain, poll, run_entry, stream};
use integration::{Start, tool};

const T: Duration = Duration::from_secs(30);

#[test]
fn two_migrations_are_listed_and_a_killed_one_shows_as_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let source = dir.path().join("legacy.img");
    dense_file(&source, 16 * MIB, 0x77);
    let args = |id: &str| {
        Start::new(
            &source,
            dir.path().join(format!("{id}.raw")),
            &dir.path().join(id),
        )
        .state(dir.path().join(id).join("state"))
        .rate_limit(Some("1M"))
        .args(&["--run-dir", run.to_str().unwrap()])
    };
    std::fs::create_dir_all(dir.path().join("db01")).unwrap();
    std::fs::create_dir_all(dir.path().join("web01")).unwrap();
    let db = args("db01").spawn();
    let web = args("web01").args(&["--id", "web"]).spawn();

    let out = tool::run_ok(&mut stream(&run, &["status", "--json"]), T);
    let list = assert_valid("status-list", &out.stdout_lossy());
    let ids: Vec<&str> = list["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["db01.raw", "web"], "{list}");
    for (m, running) in list["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .zip([&db, &web])
    {
        assert_eq!(m["running"], true, "{m}");
        assert_eq!(m["pid"], running.pid(), "{m}");
        assert_eq!(m["export_uri"], running.uri.as_str(), "{m}");
        assert_valid("status", &m["status"].to_string());
    }

    // The table, for people: a header and one line per migration.
    let out = tool::run_ok(&mut stream(&run, &["status"]), T);
    let table = out.stdout_lossy();
    assert!(
        is_plain(&table) && is_plain(&out.stderr_lossy()),
        "{}",
        out.describe()
    );
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("ETA"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("db01.raw") && lines[1].contains("streaming"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("web ") && lines[2].contains(&web.uri),
        "{table}"
    );

    // The same ID for another migration is refused while web runs.
    std::fs::create_dir_all(dir.path().join("other")).unwrap();
    let out = args("other").args(&["--id", "web"]).refused();
    let err = out.stderr_lossy();
    assert!(
        err.contains("\"web\" is taken") && err.contains("--id"),
        "the refusal names neither the id nor the way out: {err}"
    );
    assert!(
        !dir.path().join("other").join("state").exists(),
        "the refused start created its state before checking the id"
    );

    // SIGKILL leaves the entry behind: listed as not running.
    web.kill9();
    let out = tool::run_ok(&mut stream(&run, &["status", "--json"]), T);
    let list = assert_valid("status-list", &out.stdout_lossy());
    let web_entry = &list["migrations"][1];
    assert_eq!(web_entry["id"], "web", "{list}");
    assert_eq!(web_entry["running"], false, "{list}");
    assert!(web_entry["status"].is_null(), "{list}");
    let table = tool::run_ok(&mut stream(&run, &["status"]), T).stdout_lossy();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web ") && l.contains("not running")),
        "{table}"
    );
    // Restarted, it takes its entry back.
    let web = args("web01").args(&["--id", "web"]).spawn();
    let entry = run_entry(&run, "web", T);
    assert_eq!(entry["pid"], web.pid(), "{entry}");

    // A clean stop removes the entry.
    db.sigterm_and_wait(T);
    poll("db01's entry removed", T, || {
        (!run.join("db01.raw.json").exists()).then_some(())
    });
    drop(web);
}

#[test]
fn on_a_terminal_status_start_and_finalize_draw_bars_and_no_color_drops_the_colour() {
    let script = tool::require_tool("script", "util-linux");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let source = dir.path().join("legacy.img");
    dense_file(&source, 16 * MIB, 0x78);
    let start = Start::new(&source, dir.path().join("t.raw"), dir.path())
        .rate_limit(Some("1M"))
        .args(&["--run-dir", run.to_str().unwrap()]);
    let running = start.spawn();
    let state = start.state_dir().to_str().unwrap().to_string();
    let bin = integration::binary::stream_bin()
        .to_str()
        .unwrap()
        .to_string();
    // `script` gives the command a pseudo-terminal and copies what it
    // draws into the file; `timeout` ends the endless --watch.
    let draw = |prefix: &str, flags: &str| {
        let typescript = dir.path().join("typescript");
        let mut cmd = std::process::Command::new(&script);
        cmd.args(["-q", "-e", "-c"])
            .arg(format!(
                "{prefix} timeout -s INT 3 {bin} {flags} status --watch --state {state}"
            ))
            .arg(&typescript);
        let _ = tool::run(&mut cmd, T);
        std::fs::read_to_string(&typescript).unwrap_or_default()
    };
    let drawn = draw("", "");
    assert!(
        drawn.contains("present") && drawn.contains("/s, ETA"),
        "no bar with rate and ETA on a terminal: {drawn:?}"
    );
    assert!(
        drawn.contains("\u{1b}[2K"),
        "no bar redrawn in place: {drawn:?}"
    );
    assert!(
        drawn.contains("\u{1b}[36m"),
        "no colour on a terminal: {drawn:?}"
    );
    let plain = draw("NO_COLOR=1", "");
    assert!(plain.contains("/s, ETA"), "{plain:?}");
    assert!(
        !plain.contains("\u{1b}[36m"),
        "colour despite NO_COLOR: {plain:?}"
    );
    // --quiet: the plain report every second, no bar.
    let quiet = draw("", "--quiet");
    assert!(quiet.matches("migration ").count() >= 2, "{quiet:?}");
    assert!(
        is_plain(&quiet),
        "terminal drawing despite --quiet: {quiet:?}"
    );

    // `stream start` on a terminal: the same bar, under the log lines.
    let typescript = dir.path().join("start-typescript");
    let other = dir.path().join("other.raw");
    let mut cmd = std::process::Command::new(&script);
    cmd.args(["-q", "-e", "-c"])
        .arg(format!(
            "timeout -s INT 3 {bin} --run-dir {} start --source {} --target {} --listen 127.0.0.1:0 --rate-limit 1M",
            run.display(),
            source.display(),
            other.display()
        ))
        .arg(&typescript);
    let _ = tool::run(&mut cmd, T);
    let drawn = std::fs::read_to_string(&typescript).unwrap_or_default();
    assert!(
        drawn.contains("present") && drawn.contains("/s, ETA") && drawn.contains("stopped cleanly"),
        "stream start drew no bar (or did not stop cleanly): {drawn:?}"
    );

    // `stream finalize` on a terminal: hydrate, manifest and verify bars.
    drop(running);
    let typescript = dir.path().join("finalize-typescript");
    let mut cmd = std::process::Command::new(&script);
    cmd.args(["-q", "-e", "-c"])
        .arg(format!(
            "{bin} --run-dir {} finalize --verify --state {state}",
            run.display()
        ))
        .arg(&typescript);
    let out = tool::run(&mut cmd, Duration::from_secs(120));
    let drawn = std::fs::read_to_string(&typescript).unwrap_or_default();
    assert!(out.status.success(), "{}\n{drawn:?}", out.describe());
    for step in ["hydrate", "manifest", "verify"] {
        assert!(
            drawn.contains(&format!("{step} [")),
            "no {step} bar on a terminal: {drawn:?}"
        );
    }
    assert!(
        drawn.contains("finalized: boot the instance from"),
        "{drawn:?}"
    );
}
