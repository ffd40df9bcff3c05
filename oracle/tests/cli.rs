//! The argument hunt: every `oracle` subcommand over generated argument sets (zero, one,
//! negative-looking, huge, not a number; mismatched combinations; missing, unreadable and wrong
//! kinds of paths). Each run must end normally, or print one line that starts with `error:`
//! and exit with 2 (usage: clap refused an argument) or 1 (failure: the run refused or broke),
//! never panic; and a path's label must say what ran. CPU paths only (`--cpu`), so it runs in
//! CI; on the GPU machine (`BITEXACT_CLI_GPU=1`, which `.gpu/run cli` sets) the GPU paths of
//! every subcommand get their own hunt.

use std::path::PathBuf;
use std::process::Command;

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The binary under test: `BITEXACT_ORACLE` where the tests run away from the build (the GPU
/// machine's `.gpu/oracle`), else the one cargo built beside them.
fn oracle_bin() -> String {
    std::env::var("BITEXACT_ORACLE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_oracle").to_owned())
}

/// Runs the CPU hunt's sets without `BITEXACT_REQUIRE_GPU`, so that a GPU-less machine with
/// the switch set does not turn their (CPU) runs into failures.
fn oracle(args: &[String]) -> Outcome {
    run_oracle(args, Require::Unset)
}

/// How a run sees `BITEXACT_REQUIRE_GPU`.
#[derive(Clone, Copy)]
enum Require {
    /// Removed: the CPU hunt's runs.
    Unset,
    /// As the test's own environment has it: the GPU hunt's runs.
    Inherit,
    /// Set to 1.
    Set,
}

fn run_oracle(args: &[String], require: Require) -> Outcome {
    let mut cmd = Command::new(oracle_bin());
    cmd.args(args);
    match require {
        Require::Unset => {
            cmd.env_remove("BITEXACT_REQUIRE_GPU");
        }
        Require::Inherit => {}
        Require::Set => {
            cmd.env("BITEXACT_REQUIRE_GPU", "1");
        }
    }
    // No set may hang (a FIFO read, say): each gets HANG_SECS, then fails the test.
    use std::io::Read;
    use std::process::Stdio;
    let what = format!("oracle {}", args.join(" "));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running oracle");
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = r.read_to_end(&mut b);
            String::from_utf8_lossy(&b).into_owned()
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(HANG_SECS);
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for oracle") {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {HANG_SECS} s (a hang)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Outcome {
        // A signal's death (no code) is a failure of its own: -1.
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Whether a refused or failed run said why in exactly one line starting with `error`.
fn one_error_line(o: &Outcome) -> bool {
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    lines.len() == 1 && lines[0].starts_with("error")
}

/// Seconds a set may run before it counts as a hang (the CPU sets take well under one).
const HANG_SECS: u64 = 120;

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitexact-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The words of one command line, split at spaces (for argument sets with no empty argument).
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
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
    for flag in [
        "--sequences",
        "--max-len",
        "--pages",
        "--max-live",
        "--max-chunk",
        "--seed",
    ] {
        for v in VALUES {
            let mut a = s(&["batch", "--cpu", "--max-len", "40"]);
            a.extend(s(&[flag, v]));
            sets.push(a);
        }
    }
    for v in VALUES {
        sets.push(s(&["fastscan", "--cpu", "--len", v]));
        sets.push(s(&["speed", "--steps", v]));
    }
    let missing = p("missing.gguf");
    let dir_s = dir.display().to_string();
    let (ids, o) = (p("ids.u32"), p("o"));
    for extra in [
        vec!["model", "--cpu", "--preset", "nope"],
        vec!["batch", "--cpu", "--preset", "nope"],
        vec!["batch", "--cpu", "--max-len", "600"], // above tiny's context
        words("batch --cpu --preset tiny-hybrid --max-len 40"),
        vec!["batch", "--cpu", "--max-len", "40", "--json", &dir_s],
        vec!["batch", "--cpu", "--max-len", "40", "--pages", "67108863"], // 2^32 / 64 - 1
        vec!["batch", "--cpu", "--max-len", "40", "--pages", "67108864"], // past u32 slots
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
        vec!["model", "--tokens", "4", "--kv", "fastscan3"], // no --cpu: tiny's head dim 16
        vec!["model", "--cpu", "--gguf", &missing],
        vec!["model", "--cpu", "--gguf", &dir_s],
        vec!["model", "--cpu", "--tokens", "2", "--json", &dir_s],
        words("model --cpu --tokens 4 --scan v4"),
        words("moe-block --cpu --tokens 2 --experts 8 --top-k 9"),
        words("moe-block --cpu --tokens 2 --format Q8_0 --dim 33"),
        vec!["inspect", &missing],
        vec!["inspect", &dir_s],
        vec!["export", &dir_s],
        vec!["export", &p("no/such/dir/x.gguf")],
        vec!["export", &p("x.gguf"), "--preset", "nope"],
        vec!["logits", "--tokens", &missing, "--out", &p("o")],
        vec!["logits", "--tokens", &p("ids3.u32"), "--out", &p("o")],
        vec!["logits", "--tokens", &p("big-id.u32"), "--out", &p("o")],
        vec!["logits", "--tokens", &ids, "--out", &dir_s],
        vec!["inspect", &p("empty.gguf")],
        vec!["no-such-command"],
        vec![],
    ] {
        sets.push(s(&extra));
    }
    // A GGUF that is a folder, an empty file or not GGUF at all.
    for gguf in [dir_s, p("empty.gguf"), p("text.gguf")] {
        sets.push(s(&[
            "logits", "--tokens", &ids, "--out", &o, "--gguf", &gguf,
        ]));
    }
    sets
}

/// The GPU paths of every subcommand on the tiny presets, over values that pass clap's checks
/// and reach the runner (too many tokens, layers, sequences or positions for the model, a
/// device that does not exist) and a few that do not. Each GPU run compiles its kernels, so
/// the sets are few.
fn gpu_argument_sets() -> Vec<Vec<String>> {
    let mut sets = Vec::new();
    let speed = |extra: &[&str]| {
        let mut a = s(&["speed", "--preset", "tiny", "--steps", "2", "--reps", "1"]);
        a.extend(s(extra));
        a
    };
    // 600: past the tiny presets' 512 positions (and their 2 layers); 100: a batch of many
    // sequences that still runs in seconds.
    for v in ["0", "1", "600", "abc"] {
        sets.push(speed(&["--prefill", v, "--decode-at", "8"]));
        sets.push(speed(&["--prefill", "8", "--decode-at", v]));
        sets.push(speed(&[
            "--prefill",
            "8",
            "--decode-at",
            "8",
            "--layers",
            v,
        ]));
        sets.push(s(&["model", "--tokens", "3", "--chunk", v]));
        sets.push(s(&["model", "--tokens", v]));
        sets.push(s(&["fastscan", "--len", v]));
    }
    for v in ["0", "1", "100", "abc"] {
        sets.push(speed(&[
            "--prefill",
            "8",
            "--decode-at",
            "8",
            "--sequences",
            v,
        ]));
        sets.push(s(&["batch", "--max-len", "40", "--sequences", v]));
    }
    for extra in [
        words("speed --preset tiny-hybrid --prefill 8 --decode-at 8 --steps 2 --reps 1"),
        words("speed --preset tiny --device 9 --prefill 8 --decode-at 8"),
        words("speed --preset tiny --format Q4_K --prefill 8 --decode-at 8"),
        vec!["model", "--tokens", "3", "--device", "9"],
        vec!["model", "--preset", "tiny-hybrid", "--tokens", "5"],
        vec!["model", "--tokens", "600"], // above tiny's context
        vec!["model", "--tokens", "5", "--paths", "gpu-seq,gpu-batched"],
        words("moe-block --tokens 2 --dim 64 --experts 4 --top-k 5"),
        words("moe-block --tokens 3 --dim 64 --experts 4 --top-k 2 --format Q4_K"),
        words("batch --preset tiny-hybrid --max-len 40 --sequences 3"),
        vec!["batch", "--max-len", "600"], // above tiny's context
    ] {
        sets.push(s(&extra));
    }
    sets
}

/// Runs `sets`, requiring each to end normally or with one `error` line (exit 1 or 2) and no
/// panic; returns (ran, usage errors, failures).
fn hunt(sets: &[Vec<String>], require: Require) -> (usize, usize, usize) {
    let (mut ok, mut usage, mut failed) = (0, 0, 0);
    for args in sets {
        let o = run_oracle(args, require);
        let what = format!("oracle {}", args.join(" "));
        assert!(
            !o.stderr.contains("panicked"),
            "{what} panicked:\n{}",
            o.stderr
        );
        match o.code {
            0 => ok += 1,
            1 | 2 => {
                assert!(
                    one_error_line(&o),
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
    (ok, usage, failed)
}

#[test]
fn no_argument_set_panics_and_errors_are_one_line() {
    let dir = scratch();
    let sets = argument_sets(&dir);
    let (ok, usage, failed) = hunt(&sets, Require::Unset);
    println!(
        "{} argument sets: {ok} ran, {usage} refused as usage errors (exit 2), {failed} failed with a reason (exit 1)",
        sets.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The GPU hunt, on the GPU machine only (`BITEXACT_CLI_GPU=1`); it requires runs that
/// succeeded, so that a machine without a device cannot pass it on refusals alone.
#[test]
fn no_gpu_argument_set_panics_and_errors_are_one_line() {
    if std::env::var("BITEXACT_CLI_GPU").map_or(true, |v| v != "1") {
        println!(
            "SKIP gpu argument hunt: set BITEXACT_CLI_GPU=1 on a GPU machine (.gpu/run cli does)"
        );
        return;
    }
    let sets = gpu_argument_sets();
    let (ok, usage, failed) = hunt(&sets, Require::Inherit);
    println!(
        "{} GPU argument sets: {ok} ran, {usage} refused as usage errors (exit 2), {failed} failed with a reason (exit 1)",
        sets.len()
    );
    assert!(ok > 0, "no GPU argument set ran: is there a device?");
}

/// With `BITEXACT_REQUIRE_GPU=1` every subcommand with GPU paths runs them or fails with one
/// line naming the switch: never the CPU paths alone under a run that asked for the GPU.
#[test]
fn required_gpu_is_run_or_refused() {
    let moe = words("moe-block --tokens 2 --dim 64 --experts 4 --top-k 2 --ffn 32 --shared-ffn 32");
    for args in [
        s(&["model", "--tokens", "3"]),
        s(&moe),
        s(&["fastscan", "--len", "8"]),
        s(&["batch", "--max-len", "40", "--sequences", "12"]),
    ] {
        let o = run_oracle(&args, Require::Set);
        let what = format!("oracle {}", args.join(" "));
        match o.code {
            // A device opened: the GPU paths ran (the device line names it).
            0 => assert!(
                o.stdout.contains("device: ") && !o.stdout.contains("device: none"),
                "{what}:\n{}",
                o.stdout
            ),
            1 => assert!(
                o.stderr.contains("BITEXACT_REQUIRE_GPU=1") && o.stderr.lines().count() == 1,
                "{what}: {}",
                o.stderr
            ),
            c => panic!("{what}: exit {c}\n{}", o.stderr),
        }
    }
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

/// What the reliability rules promise, case by case: the exit status README states (2 for
/// arguments refused before anything ran, 1 for a run that failed or compared nothing), and no
/// special file ever replaced. The special files live in a scratch folder: a FIFO, symbolic
/// links (to a FIFO, to a regular file, dangling), a device node made there with mknod (when
/// running as root, as CI does; said when skipped) and a read-only folder.
#[test]
fn outputs_and_exit_codes_follow_the_rules() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = scratch().join("rules");
    std::fs::create_dir_all(&dir).unwrap();
    let p = |name: &str| dir.join(name).display().to_string();
    let fifo = p("fifo");
    let c = std::ffi::CString::new(fifo.clone()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {fifo}"
    );
    let dev = p("null-twin");
    let cdev = std::ffi::CString::new(dev.clone()).unwrap();
    // SAFETY: a NUL-terminated path; a character node of /dev/null's numbers (1, 3), in the
    // scratch folder, never a real device path.
    let have_dev =
        unsafe { libc::mknod(cdev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0;
    if !have_dev {
        println!("SKIP the device-node cases: mknod needs root (CI runs as root)");
    }
    std::fs::write(p("regular.json"), b"old").unwrap();
    std::os::unix::fs::symlink(p("regular.json"), p("link-to-regular")).unwrap();
    std::os::unix::fs::symlink(&fifo, p("link-to-fifo")).unwrap();
    std::os::unix::fs::symlink(p("new-target.json"), p("dangling")).unwrap();
    std::fs::create_dir_all(p("read-only")).unwrap();
    std::fs::set_permissions(p("read-only"), std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::write(p("ids.u32"), [1u8, 0, 0, 0, 2, 0, 0, 0]).unwrap();
    std::fs::write(p("big-id.u32"), 99_999u32.to_le_bytes()).unwrap();

    let tiny = ["model", "--cpu", "--tokens", "2"];
    let with = |base: &[&str], extra: &[&str]| {
        let mut v = s(base);
        v.extend(s(extra));
        v
    };
    // (arguments, the exit status README promises)
    let mut cases: Vec<(Vec<String>, i32)> = vec![
        (with(&tiny, &["--json", &fifo]), 2),
        (with(&tiny, &["--json", &p("link-to-fifo")]), 2),
        (with(&tiny, &["--json", &dir.display().to_string()]), 2),
        (with(&tiny, &["--json", &p("no/such/folder/r.json")]), 2),
        (with(&tiny, &["--json", &p("link-to-regular")]), 0),
        (with(&tiny, &["--json", &p("dangling")]), 0),
        (s(&["export", &fifo]), 2),
        (s(&["export", &p("link-to-fifo")]), 2),
        (s(&["logits", "--tokens", &p("ids.u32"), "--out", &fifo]), 2),
        (
            s(&["logits", "--tokens", &p("big-id.u32"), "--out", &p("o.f32")]),
            2,
        ),
        (s(&["inspect", &fifo]), 2),
        (s(&["logits", "--tokens", &fifo, "--out", &p("o.f32")]), 2),
        (s(&["model", "--cpu", "--gguf", &fifo]), 2),
        // Nothing compared: exit 1, not a verdict.
        (with(&tiny, &["--paths", "cpu"]), 1),
        (
            s(&["fastscan", "--cpu", "--len", "40", "--cpu-positions", "4"]),
            1,
        ),
        // Flags that would be ignored, or that conflict.
        (s(&["model", "--cpu", "--paths", "gpu-seq,gpu-batched"]), 2),
        (with(&tiny, &["--quality"]), 2), // --kv f32: nothing to measure
        (
            s(&words("speed --kv fastscan4 --batched-only --sequences 2")),
            2,
        ),
        // What a KV mode costs, on the CPU: a verdict and the quality line.
        (with(&tiny, &["--kv", "f16", "--quality"]), 0),
        // The chunked scan order: the CPU paths, and what it costs.
        (
            s(&words(
                "model --cpu --preset tiny-hybrid --tokens 70 --scan-order chunked --quality",
            )),
            0,
        ),
        (
            s(&words(
                "speed --scan-order chunked --batched-only --sequences 2",
            )),
            2,
        ),
        (with(&tiny, &["--scan-order", "chunked"]), 2), // tiny has no DeltaNet layer
        (
            s(&words("batch --cpu --preset tiny --scan-order chunked")),
            2,
        ),
        (
            with(&tiny, &["--paths", "cpu,cpu-batched", "--chunk", "1"]),
            2,
        ),
        (
            s(&[
                "model",
                "--cpu",
                "--gguf",
                &p("ids.u32"),
                "--preset",
                "small",
            ]),
            2,
        ),
        (
            s(&[
                "model",
                "--cpu",
                "--gguf",
                &p("ids.u32"),
                "--format",
                "Q4_K",
            ]),
            2,
        ),
        (s(&["model", "--cpu", "--max-context", "99999999999"]), 2),
        (s(&["fastscan", "--cpu", "--cpu-positions", "0"]), 2),
        (s(&["fastscan", "--cpu", "--bits", "5"]), 2),
        // Sizes refused from the arguments, before allocating.
        (s(&words("moe-block --cpu --dim 1000000 --experts 1000")), 2),
        (s(&["fastscan", "--cpu", "--len", "10000000000"]), 2),
        // Refused before anything ran.
        (s(&["model", "--cpu", "--preset", "nope"]), 2),
        (s(&["model", "--cpu", "--paths", "bogus"]), 2),
        (s(&["model", "--cpu", "--tokens", "1000"]), 2),
        (s(&["fastscan", "--cpu", "--len", "0"]), 2),
        (s(&["batch", "--cpu", "--preset", "nope"]), 2),
        (s(&["export", &p("x.gguf"), "--preset", "nope"]), 2),
    ];
    if have_dev {
        cases.push((with(&tiny, &["--json", &dev]), 2));
        cases.push((s(&["export", &dev]), 2));
        cases.push((s(&["inspect", &dev]), 2));
    }
    // As root the read-only folder is writable (root passes permission checks): the run
    // succeeds; as anyone else it is refused before running.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    cases.push((
        with(&tiny, &["--json", &p("read-only/r.json")]),
        if root { 0 } else { 2 },
    ));
    for (args, want) in &cases {
        let o = oracle(args);
        let what = format!("oracle {}", args.join(" "));
        assert_eq!(o.code, *want, "{what}: exit {}\n{}", o.code, o.stderr);
        if *want != 0 {
            assert!(
                one_error_line(&o),
                "{what}: not one `error` line:\n{}",
                o.stderr
            );
        }
        // Nothing special replaced, no temporary file left.
        assert!(
            std::fs::metadata(&fifo).unwrap().file_type().is_fifo(),
            "{what}: the FIFO"
        );
        if have_dev {
            let m = std::fs::metadata(&dev).unwrap();
            assert!(m.file_type().is_char_device(), "{what}: the device node");
        }
        for l in ["link-to-regular", "link-to-fifo", "dangling"] {
            let m = std::fs::symlink_metadata(p(l)).unwrap();
            assert!(m.file_type().is_symlink(), "{what}: {l} replaced");
        }
        let partial: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect();
        assert!(partial.is_empty(), "{what}: left {partial:?}");
    }
    // The links were followed: their targets hold the reports.
    for target in ["regular.json", "new-target.json"] {
        let text = std::fs::read_to_string(p(target)).unwrap();
        assert!(text.contains("\"mode\": \"model\""), "{target}: {text}");
    }
    println!(
        "{} rule cases: every exit status as README states, no special file replaced",
        cases.len()
    );
    std::fs::set_permissions(p("read-only"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
