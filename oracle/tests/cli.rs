//! The argument hunt: every `oracle` subcommand over generated argument sets (zero, one,
//! negative-looking, huge, not a number; mismatched combinations; missing, unreadable and wrong
//! kinds of paths). Each run must end normally, or print one line that starts with `error:`
//! and exit with 2 (usage: clap refused an argument) or 1 (failure: the run refused or broke),
//! never panic; and a path's label must say what ran. CPU paths only (`--cpu`), so it runs in
//! CI.

use std::path::PathBuf;
use std::process::Command;

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn oracle(args: &[String]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_oracle"))
        .args(args)
        .env_remove("BITEXACT_REQUIRE_GPU")
        .output()
        .expect("running oracle");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitexact-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

const VALUES: [&str; 7] = ["0", "1", "-1", "3", "18446744073709551616", "abc", ""];

fn argument_sets(dir: &std::path::Path) -> Vec<Vec<String>> {
    let p = |name: &str| dir.join(name).display().to_string();
    std::fs::write(p("empty.gguf"), b"").unwrap();
    std::fs::write(p("text.gguf"), b"not a gguf file at all").unwrap();
    std::fs::write(p("ids3.u32"), [1u8, 2, 3]).unwrap();
    std::fs::write(p("ids.u32"), [1u8, 0, 0, 0, 2, 0, 0, 0]).unwrap();
    std::fs::write(p("big-id.u32"), 99_999u32.to_le_bytes()).unwrap();
    let mut sets = Vec::new();
    for flag in [
        "--tokens",
        "--chunk",
        "--cpu-layers",
        "--cpu-tokens",
        "--seed",
        "--max-context",
    ] {
        for v in VALUES {
            let mut a = s(&["model", "--cpu"]);
            if flag != "--tokens" {
                a.extend(s(&["--tokens", "3"]));
            }
            a.extend(s(&[flag, v]));
            sets.push(a);
        }
    }
    let base_moe = [
        ("--tokens", "2"),
        ("--dim", "64"),
        ("--experts", "4"),
        ("--top-k", "2"),
        ("--ffn", "32"),
        ("--shared-ffn", "32"),
    ];
    for (flag, _) in base_moe {
        for v in VALUES {
            let mut a = s(&["moe-block", "--cpu"]);
            for (f, d) in base_moe {
                a.extend(s(&[f, if f == flag { v } else { d }]));
            }
            sets.push(a);
        }
    }
    for v in VALUES {
        sets.push(s(&["fastscan", "--cpu", "--len", v]));
        sets.push(s(&["speed", "--steps", v]));
    }
    let missing = p("missing.gguf");
    let dir_s = dir.display().to_string();
    for extra in [
        vec!["model", "--cpu", "--preset", "nope"],
        vec!["model", "--cpu", "--preset", "tiny-hybrid", "--tokens", "5"], // the hybrid model
        vec!["export", &p("h.gguf"), "--preset", "tiny-hybrid"],
        vec!["model", "--cpu", "--format", "Q9_9"],
        vec!["model", "--cpu", "--preset", "tiny", "--format", "Q4_K"], // dim 64 < the Q4_K block
        vec!["model", "--cpu", "--tokens", "600"],                      // above tiny's context
        vec!["model", "--cpu", "--tokens", "4", "--chunk", "10"],       // chunk above tokens
        vec!["model", "--cpu", "--tokens", "4", "--cpu-tokens", "9"],
        vec!["model", "--cpu", "--tokens", "4", "--cpu-layers", "9"],
        vec!["model", "--cpu", "--tokens", "4", "--paths", "cpu,gpu-sek"],
        vec!["model", "--cpu", "--tokens", "4", "--kv", "f16"],
        vec!["model", "--cpu", "--tokens", "4", "--kv", "fastscan4"], // tiny's head dim 16
        vec!["model", "--cpu", "--tokens", "4", "--kv", "fastscan5"],
        vec!["model", "--cpu", "--tokens", "4", "--kv", ""],
        vec!["model", "--tokens", "4", "--kv", "fastscan3"], // no --cpu: the GPU paths refused
        vec!["model", "--cpu", "--gguf", &missing],
        vec!["model", "--cpu", "--gguf", &dir_s],
        vec!["model", "--cpu", "--tokens", "2", "--json", &dir_s],
        vec![
            "moe-block",
            "--cpu",
            "--tokens",
            "2",
            "--experts",
            "8",
            "--top-k",
            "9",
        ],
        vec![
            "moe-block",
            "--cpu",
            "--tokens",
            "2",
            "--format",
            "Q8_0",
            "--dim",
            "33",
        ],
        vec!["inspect", &missing],
        vec!["inspect", &dir_s],
        vec!["export", &dir_s],
        vec!["export", &p("no/such/dir/x.gguf")],
        vec!["export", &p("x.gguf"), "--preset", "nope"],
        vec!["logits", "--tokens", &missing, "--out", &p("o")],
        vec!["logits", "--tokens", &p("ids3.u32"), "--out", &p("o")],
        vec!["logits", "--tokens", &p("big-id.u32"), "--out", &p("o")],
        vec!["logits", "--tokens", &p("ids.u32"), "--out", &dir_s],
        vec![
            "logits",
            "--tokens",
            &p("ids.u32"),
            "--out",
            &p("o"),
            "--gguf",
            &dir_s,
        ],
        vec![
            "logits",
            "--tokens",
            &p("ids.u32"),
            "--out",
            &p("o"),
            "--gguf",
            &p("empty.gguf"),
        ],
        vec![
            "logits",
            "--tokens",
            &p("ids.u32"),
            "--out",
            &p("o"),
            "--gguf",
            &p("text.gguf"),
        ],
        vec!["inspect", &p("empty.gguf")],
        vec!["no-such-command"],
        vec![],
    ] {
        sets.push(s(&extra));
    }
    sets
}

#[test]
fn no_argument_set_panics_and_errors_are_one_line() {
    let dir = scratch();
    let sets = argument_sets(&dir);
    let (mut ok, mut usage, mut failed) = (0, 0, 0);
    for args in &sets {
        let o = oracle(args);
        let what = format!("oracle {}", args.join(" "));
        assert!(
            !o.stderr.contains("panicked"),
            "{what} panicked:\n{}",
            o.stderr
        );
        match o.code {
            0 => ok += 1,
            1 | 2 => {
                let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
                assert!(
                    lines.len() == 1 && lines[0].starts_with("error"),
                    "{what}: exit {} with stderr not one `error` line:\n{}",
                    o.code,
                    o.stderr
                );
                if o.code == 2 {
                    usage += 1;
                } else {
                    failed += 1;
                }
            }
            c => panic!("{what}: exit status {c}\n{}", o.stderr),
        }
    }
    println!(
        "{} argument sets: {ok} ran, {usage} refused as usage errors (exit 2), {failed} failed with a reason (exit 1)",
        sets.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Zero counts are usage errors, not runs under a label that says otherwise.
#[test]
fn zero_counts_are_refused() {
    for flag in ["--tokens", "--chunk", "--cpu-tokens", "--cpu-layers"] {
        let o = oracle(&s(&["model", "--cpu", flag, "0"]));
        assert_eq!(o.code, 2, "{flag} 0: {}", o.stderr);
        assert!(o.stderr.contains("at least 1"), "{flag} 0: {}", o.stderr);
    }
}

/// A chunked path's label and its forward calls say the same thing.
#[test]
fn chunked_path_labels_say_what_ran() {
    let o = oracle(&s(&["model", "--cpu", "--tokens", "5", "--chunk", "2"]));
    assert_eq!(o.code, 0, "{}", o.stderr);
    let line = o
        .stdout
        .lines()
        .find(|l| l.starts_with("cpu-chunked-2 "))
        .unwrap_or_else(|| panic!("no cpu-chunked-2 row:\n{}", o.stdout));
    assert!(line.contains("[2, 2, 1]"), "{line}");
}
