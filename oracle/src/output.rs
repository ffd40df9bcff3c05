//! What the oracle writes and how it says why it refused: output paths checked before anything
//! runs, files written whole or not at all, and the errors that mean "bad arguments" (exit
//! status 2) rather than "the run failed" (1).
//!
//! An output path names a regular file, new or existing; a symbolic link is followed and its
//! target written. A path that exists and is not a regular file (a device such as `/dev/full`,
//! a FIFO, a directory) is refused before anything runs, so nothing is ever put in its place.
//! A file is written to a temporary file beside its target and renamed over it once complete;
//! the temporary file is removed on an error and on SIGINT or SIGTERM.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};

use anyhow::{Context, Result};

/// Arguments refused before anything ran: the process exits with status 2 (README).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Returns early with a [`Usage`] error (exit status 2) built like `format!`.
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new($crate::output::Usage(format!($($arg)*))))
    };
}
pub(crate) use usage;

/// A [`Usage`] error from any displayable error (a refused preset name, say).
pub fn usage_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Usage(e.to_string()))
}

/// The kind of a file that is not a regular one, for messages.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Follows `path` through symbolic links (at most 40, as the kernel does) to the path that
/// would be written; a dangling link resolves to its missing target.
fn resolve(flag: &str, path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    // 40 links followed, as the kernel does; the 41st lookup must find no link.
    for _ in 0..=40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p)
                    .with_context(|| format!("{}: reading the link", named(flag, path)))?;
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(p),
        }
    }
    usage!(
        "{}: more than 40 symbolic links to follow",
        named(flag, path)
    )
}

/// How a message names a path: after its flag, when one is given (clap names the flag itself
/// for a value parser's error).
fn named(flag: &str, path: &Path) -> String {
    match flag {
        "" => path.display().to_string(),
        f => format!("{f} {}", path.display()),
    }
}

/// An output file named by a flag, checked before anything runs.
#[derive(Clone, Debug)]
pub struct Output {
    flag: &'static str,
    shown: PathBuf,
    target: PathBuf,
}

impl Output {
    /// Checks `path` (given as `flag`): a regular file or a new one in an existing directory,
    /// after following symbolic links. Anything else is a [`Usage`] error naming the path.
    pub fn check(flag: &'static str, path: &Path) -> Result<Output> {
        let target = resolve(flag, path)?;
        let at = named(flag, path);
        let via = if target != path {
            format!(" (a link to {})", target.display())
        } else {
            String::new()
        };
        match std::fs::metadata(&target) {
            Ok(m) if !m.is_file() => usage!(
                "{at}{via} is {}, not a regular file: name a new file or a regular one",
                kind(&m)
            ),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => usage!("{at}{via}: {e}"),
        }
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => usage!("{at}{via}: its folder {} is {}", dir.display(), kind(&m)),
            Err(e) => usage!("{at}{via}: its folder {}: {e}", dir.display()),
        }
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| usage_err(format!("{at}: a NUL byte in the path")))?;
        // SAFETY: a NUL-terminated path; access() only reads it.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            usage!(
                "{at}{via}: its folder {} is not writable ({})",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Output {
            flag,
            shown: path.to_path_buf(),
            target,
        })
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// The folder the target lives in.
    fn dir(&self) -> PathBuf {
        match self.target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Refuses, before anything runs, a file of `bytes` that the target's file system has no
    /// room for (its free space, as statvfs reports it to this user).
    pub fn check_space(&self, bytes: u64) -> Result<()> {
        let c = CString::new(self.dir().as_os_str().as_bytes())?;
        // SAFETY: statvfs fills the zeroed struct for a NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Ok(()); // unknown: the write itself will say
        }
        // The temporary file is written while the old target still holds its space.
        let free = st.f_bavail as u64 * st.f_frsize as u64;
        if bytes > free {
            usage!(
                "{}: needs {bytes} bytes, {free} free on its file system",
                named(self.flag, &self.shown)
            );
        }
        Ok(())
    }

    /// Writes `bytes` whole: [`Output::create`], then [`Pending::commit`].
    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        let mut p = self.create()?;
        p.file().write_all(bytes).map_err(|e| self.err(e))?;
        p.commit()
    }

    /// A temporary file beside the target, to be renamed over it by [`Pending::commit`];
    /// removed if dropped uncommitted, or if the process is interrupted (SIGINT, SIGTERM).
    pub fn create(&self) -> Result<Pending> {
        let name = self
            .target
            .file_name()
            .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
        let tmp = self
            .dir()
            .join(format!(".{name}.{}.partial", std::process::id()));
        // Registered before it exists, so that a signal in between still removes it; a file
        // already of that name (left by a killed run, or planted) is not written through.
        let cleanup = Cleanup::register(&tmp);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| self.err(e))?;
        Ok(Pending {
            out: self.clone(),
            tmp,
            file: Some(file),
            _cleanup: cleanup,
        })
    }

    fn err(&self, e: std::io::Error) -> anyhow::Error {
        anyhow::Error::from(e).context(format!("writing {}", self.shown.display()))
    }
}

/// A file being written ([`Output::create`]).
pub struct Pending {
    out: Output,
    tmp: PathBuf,
    file: Option<File>,
    _cleanup: Cleanup,
}

impl Pending {
    /// The temporary file.
    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until commit")
    }

    /// Flushes the file and renames it over the target.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("open until commit");
        file.sync_all().map_err(|e| self.out.err(e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.out.target).map_err(|e| self.out.err(e))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The temporary file a signal must remove (one at a time: the oracle writes its outputs one
/// after another), as a leaked C string the handler can unlink without allocating.
static PENDING: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_signal(sig: libc::c_int) {
    let p = PENDING.swap(std::ptr::null_mut(), Ordering::SeqCst);
    // SAFETY: unlink, signal and raise are async-signal-safe; p is null or a path leaked by
    // Cleanup::register and never freed while registered.
    unsafe {
        if !p.is_null() {
            libc::unlink(p);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Installs the SIGINT / SIGTERM handler that removes a pending temporary file and then ends
/// the process as the signal would have. A signal the process was started ignoring (`nohup`,
/// a background job) stays ignored.
pub fn install_signal_cleanup() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction with a null new action only reads the current one into `old`;
        // the handler installed calls async-signal-safe functions only.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Registers a temporary file with the signal handler while it lives.
struct Cleanup(*mut libc::c_char);

impl Cleanup {
    fn register(path: &Path) -> Cleanup {
        let raw = CString::new(path.as_os_str().as_bytes())
            .map(CString::into_raw)
            .unwrap_or(std::ptr::null_mut());
        let old = PENDING.swap(raw, Ordering::SeqCst);
        if !old.is_null() {
            // SAFETY: old came from CString::into_raw (a nested registration, not expected).
            drop(unsafe { CString::from_raw(old) });
        }
        Cleanup(raw)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.0.is_null() {
            return;
        }
        // Unregister only if still ours; the handler may have taken it already.
        if PENDING
            .compare_exchange(
                self.0,
                std::ptr::null_mut(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            // SAFETY: from CString::into_raw in register, no longer reachable by the handler.
            drop(unsafe { CString::from_raw(self.0) });
        }
    }
}

/// An input file: refused unless it is a regular file (a FIFO would block a read forever, a
/// device would never end), naming the flag and the path.
pub fn check_input(flag: &str, path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => usage!("{} is {}, not a regular file", named(flag, path), kind(&m)),
        Err(e) => usage!("{}: {e}", named(flag, path)),
    }
}

/// Refuses, before allocating, a run whose host memory (`bytes`, counted from its arguments)
/// exceeds what the machine has available now (`MemAvailable` of /proc/meminfo; where that
/// cannot be read, nothing is refused).
pub fn check_host_bytes(what: &str, bytes: u128) -> Result<()> {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u128>().ok())
            .map(|kb| kb * 1024)
    });
    if let Some(avail) = avail {
        if bytes > avail {
            usage!(
                "{what} needs about {:.1} GiB of host memory, {:.1} GiB is available",
                bytes as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
