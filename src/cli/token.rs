//! Token files (`DIR/auth.token`, `DIR/admin.token`) and the data directory's server lock.
//!
//! A token file holds one line: the token. The server creates it once (mode 0600, 32 random bytes
//! from `/dev/urandom` as 64 hex digits) when no token is configured, and reuses it on every
//! start; clients on the same machine read it through `--data-dir`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::protocol::TOKEN_LEN_MAX;

/// File name of the client token in the data directory.
pub const CLIENT_TOKEN_FILE: &str = "auth.token";
/// File name of the admin token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// File name of the lock `stormledger serve` holds on its data directory.
pub const SERVE_LOCK_FILE: &str = "serve.lock";

/// Checks a token is usable on the wire: 1..=120 bytes of printable ASCII.
pub fn validate(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if token.len() > TOKEN_LEN_MAX {
        return Err(format!("the token is {} bytes long; at most {TOKEN_LEN_MAX} are allowed", token.len()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".into());
    }
    Ok(())
}

/// Reads a token file. `Ok(None)` if it does not exist.
pub fn read(path: &Path) -> Result<Option<String>, String> {
    let mut text = String::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_string(&mut text).map_err(|e| format!("cannot read token file {}: {e}", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read token file {}: {e}", path.display())),
    };
    let token = text.trim().to_string();
    validate(&token).map_err(|e| format!("token file {}: {e}", path.display()))?;
    Ok(Some(token))
}

/// Reads the token file at `path`, creating it with a fresh random token if it does not exist.
/// Warns (stderr) when an existing file is readable by other users.
pub fn load_or_create(path: &Path) -> Result<String, String> {
    if let Some(token) = read(path)? {
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.mode() & 0o077 != 0 {
                eprintln!(
                    "stormledger: warning: token file {} is accessible by other users (mode {:o}); run chmod 600 on it",
                    path.display(),
                    meta.mode() & 0o777
                );
            }
        }
        return Ok(token);
    }
    let token = generate().map_err(|e| format!("cannot generate a token from /dev/urandom: {e}"))?;
    // Write a private temporary file, then link it into place: the token file appears complete
    // or not at all, and an existing one is never overwritten.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    };
    let result = write();
    let _ = std::fs::remove_file(&tmp);
    match result {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                if let Ok(dir) = File::open(dir) {
                    let _ = dir.sync_all();
                }
            }
            eprintln!("stormledger: created {} (mode 0600)", path.display());
            Ok(token)
        }
        // Someone else created it in the meantime: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(path)?.ok_or_else(|| format!("token file {} vanished while being created", path.display()))
        }
        Err(e) => Err(format!("cannot create token file {}: {e}", path.display())),
    }
}

/// 32 random bytes from the kernel, as 64 lowercase hex digits.
fn generate() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// An exclusive `flock` on `DIR/serve.lock`, held for the life of the server process.
///
/// `Node::open` takes its own lock on `DIR/LOCK` once the durable node lands; this one uses a
/// different file so the two never conflict within one process (flock locks belong to the open
/// file description), and it keeps a second server off the directory either way.
#[derive(Debug)]
pub struct ServeLock {
    _file: File,
    pub path: PathBuf,
}

impl ServeLock {
    pub fn acquire(data_dir: &Path) -> Result<ServeLock, String> {
        let path = data_dir.join(SERVE_LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let by = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
                return Err(format!(
                    "data directory {} is in use by another stormledger server{by}: lock {} is held; \
                     stop that server or use another --data-dir",
                    data_dir.display(),
                    path.display()
                ));
            }
            return Err(format!("cannot lock {}: {error}", path.display()));
        }
        // The pid is a hint for operators; the flock is the lock.
        let _ = file.set_len(0);
        let _ = file.write_all(format!("{}\n", std::process::id()).as_bytes());
        Ok(ServeLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLIENT_TOKEN_FILE);
        let first = load_or_create(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), first);
        assert_eq!(read(&path).unwrap(), Some(first));
        assert_eq!(read(&dir.path().join("missing")).unwrap(), None);
    }

    #[test]
    fn refuses_bad_tokens() {
        assert!(validate("").is_err());
        assert!(validate("a b").is_err());
        assert!(validate(&"x".repeat(121)).is_err());
        assert!(validate("good-token").is_ok());
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let lock = ServeLock::acquire(dir.path()).unwrap();
        let err = ServeLock::acquire(dir.path()).unwrap_err();
        assert!(err.contains("in use by another stormledger server"), "{err}");
        drop(lock);
        ServeLock::acquire(dir.path()).unwrap();
    }
}
