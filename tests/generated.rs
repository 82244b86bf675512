//! What is generated from the clap definitions: shell completions (bash, zsh, fish) and man
//! pages mention every verb; the daemon's `--log-format json` writes one JSON object a line.

use std::process::Command;

use snapmv_tests::daemon::{scratch, snapmv_bin, Daemon};

fn run(args: &[&str]) -> String {
    let out = Command::new(snapmv_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "snapmv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The verbs `snapmv --help` lists (its "Commands:" section, less `help`).
fn verbs() -> Vec<String> {
    let help = run(&["--help"]);
    let v: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help")
        .map(str::to_string)
        .collect();
    for must in [
        "serve",
        "create",
        "snapshot",
        "stats",
        "completions",
        "man",
        "check",
    ] {
        assert!(v.iter().any(|x| x == must), "{must} not in the verbs {v:?}");
    }
    v
}

#[test]
fn completions_mention_every_verb() {
    let verbs = verbs();
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&["completions", shell]);
        assert!(
            script.len() > 1000,
            "{shell} completion is {} bytes",
            script.len()
        );
        for v in &verbs {
            assert!(script.contains(v.as_str()), "{shell} completion lacks {v}");
        }
        // Flags of a verb are completed too.
        assert!(
            script.contains("metrics-listen"),
            "{shell} completion lacks serve's flags"
        );
    }
    let out = Command::new(snapmv_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_pages_for_snapmv_and_every_verb() {
    let dir = scratch("man");
    let out = dir.path().join("man1");
    run(&["man", out.to_str().unwrap()]);
    let main = std::fs::read_to_string(out.join("snapmv.1")).expect("snapmv.1 written");
    assert!(
        main.starts_with(".ie") || main.contains(".TH"),
        "not roff: {main:.200}"
    );
    for v in verbs() {
        // roff writes a hyphen as \-.
        let roff = v.replace('-', "\\-");
        assert!(main.contains(&roff), "snapmv.1 lacks {v}");
        let page = out.join(format!("snapmv-{v}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            text.contains(".TH") && text.contains(&roff),
            "{} does not describe {v}",
            page.display()
        );
    }
    // An unwritable directory is an error naming it.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = Command::new(snapmv_bin())
        .args(["man", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("a-file"));
}

#[test]
fn json_log_is_one_object_per_line() {
    let dir = scratch("jsonlog");
    let d = Daemon::start_with(dir.path(), &["--log-format", "json"]);
    d.ok("status", serde_json::json!({}));
    let log = d.log();
    let mut n = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line {line:?} is not JSON: {e}"));
        for k in ["ts", "level", "target", "msg"] {
            assert!(v[k].is_string(), "{k} missing in {line}");
        }
        n += 1;
    }
    assert!(
        log.lines().any(|l| l.contains("snapmv daemon ready")),
        "no ready line in\n{log}"
    );
    assert!(n > 0);
}
