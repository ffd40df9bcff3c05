//! Kernels run on the CPU under a CUDA emulator (`tests/emulate/cuda_emu.h`: a launch's blocks
//! in order, a block's threads as OS threads with their barriers and warp shuffles, the GPU's
//! IEEE f32 operations), against their references bit for bit: a check of a kernel's indexing
//! and operation order that needs no GPU, so CI runs it. It cannot see races between blocks
//! (they never overlap) or anything of the memory model: the GPU tests do.
//!
//! The family's source (`cuda/common.cuh` + `cuda/FAMILY.cu`) compiles with the host's C++
//! compiler (`CXX`, else `g++`; C++20, `-ffp-contract=off`) beside a driver
//! (`tests/emulate/*.cpp`) that launches the kernels as `src/kernels/` does. Without a compiler
//! the tests print `SKIP: no C++ compiler` and pass, unless `BITEXACT_REQUIRE_EMU=1`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use bitexact::quant::WeightFormat;
use bitexact::reference::delta_net::{
    scan_chunked_cpu, ChunkedState, DeltaNetConfig, DeltaNetWeights, SCAN_CHUNK,
};

use crate::common::{assert_bits_eq, values};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The C++ compiler, or `None` after printing why (a panic under `BITEXACT_REQUIRE_EMU=1`).
fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let ok = Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let sources = Path::new(ROOT).join("tests/emulate/cuda_emu.h").exists();
    if ok && sources {
        return Some(cxx);
    }
    let why = if ok {
        format!("the sources are not at {ROOT}")
    } else {
        format!("`{cxx} --version` did not run")
    };
    if std::env::var("BITEXACT_REQUIRE_EMU").is_ok_and(|v| v == "1") {
        panic!("BITEXACT_REQUIRE_EMU=1 but no C++ compiler for the emulated kernels: {why}");
    }
    println!("SKIP: no C++ compiler for the emulated kernels ({why})");
    None
}

/// `family`'s kernels with `driver` as one program: `cuda/common.cuh` and `cuda/FAMILY.cu`
/// with their dynamic shared memory taken from the emulator, compiled as the mutant
/// (`BITEXACT_MUTANT`) when `mutant`.
fn build(family: &str, driver: &str, mutant: bool) -> Option<PathBuf> {
    let cxx = compiler()?;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "emulate-{family}-{}",
        if mutant { "mutant" } else { "plain" }
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let read = |p: &str| std::fs::read_to_string(Path::new(ROOT).join(p)).unwrap();
    let mut text = read("cuda/common.cuh");
    text.push('\n');
    text.push_str(&dynamic_shared(&read(&format!("cuda/{family}.cu"))));
    let text = text.replace("#include \"common.cuh\"", "");
    std::fs::write(dir.join("family.h"), text).unwrap();
    let bin = dir.join("driver");
    let mut cmd = Command::new(cxx);
    cmd.args([
        "-std=c++20",
        "-O2",
        "-ffp-contract=off",
        "-fno-fast-math",
        "-pthread",
        "-w",
    ])
    .arg("-I")
    .arg(&dir)
    .arg("-I")
    .arg(Path::new(ROOT).join("tests/emulate"))
    .arg("-o")
    .arg(&bin)
    .arg(Path::new(ROOT).join("tests/emulate").join(driver));
    if mutant {
        cmd.arg("-DBITEXACT_MUTANT");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "compiling the emulated {family} kernels:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(bin)
}

/// `extern __shared__ [__align__(N)] float NAME[];` as the emulator's dynamic shared memory.
fn dynamic_shared(src: &str) -> String {
    src.lines()
        .map(|line| {
            let t = line.trim_start();
            match t.strip_prefix("extern __shared__ ") {
                Some(rest) => {
                    let rest = rest
                        .trim_start_matches(|c: char| c != 'f')
                        .strip_prefix("float ")
                        .expect("a float array");
                    let name = &rest[..rest.find('[').expect("NAME[]")];
                    format!("    float* {name} = emu_dynamic_smem();")
                }
                None => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The driver built once per process (as the mutant when `BITEXACT_MUTANT=delta_net`, as the
/// device layer compiles the family), and once more as the mutant for the self-check.
fn chunk_driver(mutant: bool) -> Option<&'static Path> {
    static PLAIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    static MUTANT: OnceLock<Option<PathBuf>> = OnceLock::new();
    let env_mutant = std::env::var("BITEXACT_MUTANT").is_ok_and(|v| v == "delta_net");
    let cell = if mutant { &MUTANT } else { &PLAIN };
    cell.get_or_init(|| build("delta_net", "delta_net_chunk.cpp", mutant || env_mutant))
        .as_deref()
}

/// The emulated chunked scan's outputs and final state over `n` tokens in calls of `pieces`
/// (cycled), and the reference's; `None` without a compiler.
fn run_chunked(
    driver: &Path,
    c: &DeltaNetConfig,
    n: usize,
    pieces: &[usize],
    seed: u64,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let w = DeltaNetWeights::generate(c, seed, 500).unwrap();
    let (cd, hv) = (c.conv_dim(), c.v_heads);
    let mixed = values(seed ^ 1, n * cd, 2.0, 0.0);
    let b = values(seed ^ 2, n * hv, 2.0, 0.0);
    let a = values(seed ^ 3, n * hv, 2.0, 0.0);
    let mut st = ChunkedState::new(c);
    let o = scan_chunked_cpu(&w, &mut st, &mixed, &b, &a, n, 1e-6);
    let want = vec![
        o,
        st.base.conv,
        st.base.m,
        st.k,
        st.u,
        st.f,
        st.e,
        vec![f32::from_bits(st.len as u32)],
    ];
    let mut case = Vec::new();
    let dims = [
        c.k_heads,
        c.v_heads,
        c.head_dim,
        c.conv_kernel,
        n,
        pieces.len(),
    ];
    for v in dims.iter().chain(pieces) {
        case.extend((*v as u32).to_le_bytes());
    }
    for v in [&w.conv, &w.dt_bias, &w.ssm_a, &mixed, &b, &a] {
        case.extend((v.len() as u32).to_le_bytes());
        v.iter().for_each(|x| case.extend(x.to_le_bytes()));
    }
    let dir = driver.parent().unwrap();
    let tag = format!("{seed}-{n}-{}-{}", c.head_dim, pieces.len());
    let (inp, outp) = (
        dir.join(format!("in-{tag}")),
        dir.join(format!("out-{tag}")),
    );
    std::fs::write(&inp, case).unwrap();
    let run = Command::new(driver).arg(&inp).arg(&outp).output().unwrap();
    assert!(run.status.success(), "the emulated driver failed: {run:?}");
    let bytes = std::fs::read(&outp).unwrap();
    let words: Vec<u32> = bytes
        .chunks(4)
        .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
        .collect();
    let (mut got, mut at) = (Vec::new(), 0);
    for _ in 0..7 {
        let len = words[at] as usize;
        got.push(
            words[at + 1..at + 1 + len]
                .iter()
                .map(|&w| f32::from_bits(w))
                .collect(),
        );
        at += 1 + len;
    }
    got.push(vec![f32::from_bits(words[at])]);
    let _ = std::fs::remove_file(inp);
    let _ = std::fs::remove_file(outp);
    (got, want)
}

fn cfg(k_heads: usize, v_heads: usize, head_dim: usize, conv: usize) -> DeltaNetConfig {
    DeltaNetConfig {
        dim: 64,
        k_heads,
        v_heads,
        head_dim,
        conv_kernel: conv,
        format: WeightFormat::F32,
    }
}

const PARTS: [&str; 8] = [
    "o", "window", "matrices", "keys", "u", "factors", "decay", "length",
];

/// The chunked order's kernels (`delta_net_chunk_*` after the prep; a call of one token the
/// one-launch `delta_net_chunk_decode_f32`), emulated, equal `scan_chunked_cpu` in the outputs
/// and the whole state: head dims 3, 16, 20, 40, 48 (a partial second block), 100 (a partial
/// fourth) and 128; windows 1-4; token counts around one and two chunk boundaries; calls of all
/// tokens, one (decode, a chunk folded by the decode kernel), 7, a chunk and mixed pieces that
/// start and end inside chunks.
#[test]
fn emulated_delta_net_chunked_equals_reference() {
    let Some(driver) = chunk_driver(false) else {
        return;
    };
    let c = SCAN_CHUNK;
    let cases: [(DeltaNetConfig, usize, &[usize]); 11] = [
        (cfg(2, 4, 16, 4), 2 * c + 5, &[2 * c + 5]),
        (cfg(2, 4, 16, 4), 2 * c + 5, &[1]),
        (cfg(2, 4, 16, 4), 2 * c + 5, &[5, c + 3, 1, 30]),
        (cfg(1, 3, 48, 2), c + 1, &[7]),
        (cfg(2, 2, 100, 1), c - 1, &[c - 1]),
        (cfg(1, 1, 3, 1), 2 * c + 2, &[c]),
        (cfg(1, 2, 128, 4), c, &[c]),
        (cfg(1, 2, 128, 4), c + 1, &[40, 25]),
        (cfg(3, 9, 20, 3), 90, &[80, 13]),
        (cfg(1, 2, 128, 4), c + 3, &[60, 1]),
        (cfg(2, 6, 40, 2), c + 2, &[1]),
    ];
    for (i, (cf, n, pieces)) in cases.iter().enumerate() {
        let (got, want) = run_chunked(driver, cf, *n, pieces, 20 + i as u64);
        for ((part, g), w) in PARTS.iter().zip(&got).zip(&want) {
            assert_bits_eq(
                &format!("emulated chunked {cf:?} n={n} pieces={pieces:?}: {part}"),
                g,
                w,
            );
        }
    }
}

/// The same check catches the family's mutant (bx_tree4 left to right): a test of these
/// kernels that can fail.
#[test]
fn emulated_delta_net_chunked_mutant_is_caught() {
    let Some(driver) = chunk_driver(true) else {
        return;
    };
    let (got, want) = run_chunked(driver, &cfg(1, 2, 128, 4), 70, &[70], 5);
    assert!(
        got[..7]
            .iter()
            .zip(&want)
            .any(|(g, w)| g.iter().zip(w).any(|(a, b)| a.to_bits() != b.to_bits())),
        "the mutant's bits equal the reference's"
    );
}
