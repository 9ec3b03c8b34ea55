//! Opening a sink's directory so that no other user can redirect a write (as
//! OpenSSH's StrictModes does it): the directory and each of its ancestors must be owned by
//! root or the user running us and not be writable by group or others (a sticky ancestor
//! like `/tmp` aside), and a symbolic link on the way is followed only when root or we own
//! it.
//!
//! The path is walked from `/` one component at a time with `openat(…, O_NOFOLLOW)`, and each
//! directory is checked on the descriptor that was opened (`fstat`), never by path: a
//! component swapped for a link after its check cannot redirect anything, because the next
//! step starts from the descriptor of what was checked. Writes then go through the final
//! descriptor (`openat`, `renameat`, `fsync`), so the file lands in the directory that was
//! checked, whatever happens to the path meanwhile.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, fstat, openat, readlinkat, statat};

/// Links followed at most (as the kernel's own limit).
const MAX_LINKS: usize = 40;

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Whether `uid` may own something on the way: root, or the user running us.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

/// Opens `dir` after checking every directory and link on the way; returns its descriptor
/// and the path it resolved to (links followed, `.` and `..` gone).
pub fn open_dir(dir: &Path) -> Result<(OwnedFd, PathBuf), String> {
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("the current directory: {e}"))?
            .join(dir)
    };
    let mut todo: VecDeque<OsString> = components(&absolute);
    let root = || openat(CWD, "/", dir_flags(), Mode::empty());
    let mut fd = root().map_err(|e| format!("opening /: {e}"))?;
    let mut resolved = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            // The parent of a directory we came through was checked on the way in.
            fd = openat(&fd, "..", dir_flags(), Mode::empty())
                .map_err(|e| format!("{}/..: {e}", resolved.display()))?;
            resolved.pop();
            continue;
        }
        let here = resolved.join(&name);
        let st = statat(&fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| format!("{}: {e}", here.display()))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            if !trusted_owner(st.st_uid) {
                return Err(format!(
                    "{} is a symbolic link owned by uid {}, a user who could point it elsewhere; \
                     only links owned by root or the user running tfa-rotator are followed",
                    here.display(),
                    st.st_uid
                ));
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(format!("{}: too many symbolic links", dir.display()));
            }
            let target = readlinkat(&fd, name.as_os_str(), Vec::new())
                .map_err(|e| format!("reading the link {}: {e}", here.display()))?;
            let target = PathBuf::from(std::ffi::OsStr::from_bytes(target.as_bytes()));
            let mut rest = components(&target);
            rest.extend(todo.drain(..));
            todo = rest;
            if target.is_absolute() {
                fd = root().map_err(|e| format!("opening /: {e}"))?;
                resolved = PathBuf::from("/");
            }
            continue;
        }
        let next = openat(&fd, name.as_os_str(), dir_flags(), Mode::empty())
            .map_err(|e| format!("{}: {e}", here.display()))?;
        // Checked on what was opened: a swap after the stat above changes nothing.
        let st = fstat(&next).map_err(|e| format!("{}: {e}", here.display()))?;
        let last = todo.is_empty();
        check_dir(&here, st.st_uid, st.st_mode, last)?;
        fd = next;
        resolved = here;
    }
    // The root itself (when `dir` is `/`).
    if resolved == Path::new("/") {
        let st = fstat(&fd).map_err(|e| format!("/: {e}"))?;
        check_dir(&resolved, st.st_uid, st.st_mode, true)?;
    }
    Ok((fd, resolved))
}

/// The StrictModes rule for one directory; `last`: the sink's own directory, where a sticky
/// bit does not excuse others' write access (they could still add files beside ours).
fn check_dir(path: &Path, uid: u32, mode: u32, last: bool) -> Result<(), String> {
    if !trusted_owner(uid) {
        return Err(format!(
            "{} is owned by uid {}; the directory of a file sink and each of its ancestors must \
             be owned by root or the user running tfa-rotator",
            path.display(),
            uid
        ));
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && (last || !sticky) {
        return Err(format!(
            "{} is writable by {} (mode {:04o}); another user could replace the file",
            path.display(),
            if mode & 0o002 != 0 {
                "others"
            } else {
                "its group"
            },
            mode & 0o7777
        ));
    }
    Ok(())
}

fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn strict_modes_rules() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        mode(&base, 0o700);
        let ok = base.join("ok");
        std::fs::create_dir(&ok).unwrap();
        mode(&ok, 0o700);
        let (_, resolved) = open_dir(&ok).unwrap();
        assert_eq!(resolved, ok);
        // `..` and `.` resolve.
        let (_, r) = open_dir(&ok.join("..").join("ok").join(".")).unwrap();
        assert_eq!(r, ok);
        // Group- or other-writable: refused.
        for m in [0o770, 0o707, 0o1777] {
            mode(&ok, m);
            let e = open_dir(&ok).unwrap_err();
            assert!(e.contains("writable by"), "{m:o}: {e}");
        }
        mode(&ok, 0o700);
        // Owned by another user: refused, also as an ancestor.
        let theirs = base.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        mode(&theirs, 0o755);
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let inner = theirs.join("inner");
        std::fs::create_dir(&inner).unwrap();
        mode(&inner, 0o700);
        assert!(
            open_dir(&theirs)
                .unwrap_err()
                .contains("owned by uid 65534")
        );
        assert!(open_dir(&inner).unwrap_err().contains("owned by uid 65534"));
        // A sticky, world-writable ancestor (like /tmp) is fine; as the directory itself not.
        let sticky = base.join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        mode(&sticky, 0o1777);
        let mine = sticky.join("mine");
        std::fs::create_dir(&mine).unwrap();
        mode(&mine, 0o700);
        open_dir(&mine).unwrap();
        assert!(open_dir(&sticky).is_err());
        // A link we own is followed; one another user owns is not.
        let link = base.join("link");
        std::os::unix::fs::symlink(&ok, &link).unwrap();
        assert_eq!(open_dir(&link).unwrap().1, ok);
        let evil = base.join("evil");
        std::os::unix::fs::symlink(&ok, &evil).unwrap();
        rustix::fs::chownat(
            CWD,
            &evil,
            Some(rustix::process::Uid::from_raw(65534)),
            None,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert!(
            open_dir(&evil)
                .unwrap_err()
                .contains("symbolic link owned by uid 65534")
        );
    }
}
