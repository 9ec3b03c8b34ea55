//! StrictModes (as OpenSSH's) for everything tfa-rotator reads, runs or writes through: the
//! config file, every file it names (secret files, key files, CA files, exec programs), the
//! directory of a file sink, and the state directory. Each of them, and every directory
//! above it up to `/`, must be owned by root or the user running us and not be writable by
//! group or others (a sticky ancestor like `/tmp` aside, never the thing's own directory),
//! and a symbolic link on the way is followed only when root or we own it. Otherwise another
//! local user could swap what we read (a hook that then gets every new set on its standard
//! input, a config that adds one) or redirect what we write.
//!
//! The path is walked from `/` one component at a time with `openat(…, O_NOFOLLOW)`, and each
//! step is checked on the descriptor that was opened (`fstat`), never by path: a component
//! swapped for a link after its check cannot redirect anything, because the next step starts
//! from the descriptor of what was checked. Ancestors are opened `O_PATH`, which needs only
//! search permission, so a 0711 home directory on the way is fine; only a file sink's own
//! directory is opened for reading (its `fsync` needs that). A [`Walker`] remembers the
//! verdict of each directory by (device, inode), so one config load checks each directory
//! once however many files sit in it.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, Stat, fstat, openat, readlinkat, statat};

/// Links followed at most (as the kernel's own limit).
const MAX_LINKS: usize = 40;

/// Why a path is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Owned by a user other than root and us.
    Owner,
    /// Writable by its group.
    GroupWritable,
    /// Writable by others.
    OthersWritable,
    /// A symbolic link owned by another user, who could point it elsewhere.
    Link,
    /// Not what was expected there (a directory where a file was named, a socket, …).
    Kind(&'static str),
    /// It does not exist.
    Missing,
    /// It could not be opened or examined.
    Io(String),
}

/// A path that fails the trust rule, with what an operator needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustError {
    /// The offending path (the file itself, or the ancestor or link that fails).
    pub path: PathBuf,
    /// Its owner's uid (when it could be examined).
    pub owner: Option<u32>,
    /// Its permission bits (when it could be examined).
    pub mode: Option<u32>,
    /// What is wrong.
    pub problem: Problem,
}

impl TrustError {
    fn new(path: &Path, st: Option<&Stat>, problem: Problem) -> Self {
        Self {
            path: path.to_path_buf(),
            owner: st.map(|s| s.st_uid),
            mode: st.map(|s| s.st_mode & 0o7777),
            problem,
        }
    }

    fn io<E: fmt::Display + 'static>(path: &Path, e: E) -> Self {
        let any = &e as &dyn std::any::Any;
        let missing = any
            .downcast_ref::<rustix::io::Errno>()
            .is_some_and(|n| *n == rustix::io::Errno::NOENT)
            || any
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound);
        let problem = if missing {
            Problem::Missing
        } else {
            Problem::Io(e.to_string())
        };
        Self::new(path, None, problem)
    }

    /// What an operator does about it.
    pub fn fix(&self) -> String {
        let p = self.path.display();
        match &self.problem {
            Problem::Owner => format!(
                "make root or the user running tfa-rotator its owner (`chown root {p}`), or \
                 move the file to a directory only they control"
            ),
            Problem::GroupWritable | Problem::OthersWritable => {
                format!("`chmod go-w {p}`")
            }
            Problem::Link => format!(
                "replace the link by one root owns, or name its target in the config \
                 (`readlink -f {p}`)"
            ),
            Problem::Kind(_) | Problem::Missing | Problem::Io(_) => {
                "name a readable file the config means".into()
            }
        }
    }
}

impl fmt::Display for TrustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.problem {
            Problem::Owner => format!(
                "is owned by uid {}, neither root nor the user running tfa-rotator",
                self.owner.unwrap_or(u32::MAX)
            ),
            Problem::GroupWritable => "is writable by its group".to_string(),
            Problem::OthersWritable => "is writable by others".to_string(),
            Problem::Link => "is a symbolic link owned by another user".to_string(),
            Problem::Kind(k) => format!("is not {k}"),
            Problem::Missing => return write!(f, "{}: does not exist", self.path.display()),
            Problem::Io(e) => return write!(f, "{}: {e}", self.path.display()),
        };
        write!(f, "{} {what}", self.path.display())?;
        match (self.owner, self.mode) {
            (Some(_), Some(mode)) if self.problem == Problem::Owner => {
                write!(f, " (mode {mode:04o})")?
            }
            (Some(uid), Some(mode)) => write!(f, " (owner uid {uid}, mode {mode:04o})")?,
            _ => {}
        }
        write!(
            f,
            "; another user could change what tfa-rotator reads, runs or writes there; fix: {}",
            self.fix()
        )
    }
}

impl std::error::Error for TrustError {}

/// What the walk ends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaf {
    /// A regular file that is read or run.
    File,
    /// A directory that is only looked up through (the state directory).
    Dir,
    /// A directory that is written into and fsync'd (a file sink's), so opened for reading.
    WritableDir,
}

/// The trust walk, with the verdicts of the directories it has seen (by device and inode).
#[derive(Default)]
pub struct Walker {
    trusted_dirs: std::collections::HashSet<(u64, u64)>,
    files: HashMap<PathBuf, Result<PathBuf, TrustError>>,
}

/// Whether `uid` may own something on the way: root, or the user running us.
pub fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

fn path_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn read_dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

impl Walker {
    /// A walker with nothing cached.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks a file that is read or run, and everything above it; returns its resolved
    /// path (links followed). The verdict of one path is computed once per walker.
    pub fn file(&mut self, path: &Path) -> Result<PathBuf, TrustError> {
        if let Some(v) = self.files.get(path) {
            return v.clone();
        }
        let v = self.walk(path, Leaf::File).map(|(_, p)| p);
        self.files.insert(path.to_path_buf(), v.clone());
        v
    }

    /// Walks `path` to its end, checking each step; returns a descriptor of what it ends on
    /// (`O_PATH` but for [`Leaf::WritableDir`]) and the resolved path.
    pub fn walk(&mut self, path: &Path, leaf: Leaf) -> Result<(OwnedFd, PathBuf), TrustError> {
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| TrustError::io(Path::new("."), e))?
                .join(path)
        };
        let mut todo: VecDeque<OsString> = components(&absolute);
        let root = || openat(CWD, "/", path_flags(), Mode::empty());
        let mut fd = root().map_err(|e| TrustError::io(Path::new("/"), e))?;
        let mut resolved = PathBuf::from("/");
        let mut links = 0;
        let st = fstat(&fd).map_err(|e| TrustError::io(&resolved, e))?;
        self.check_dir(&resolved, &st, false)?;
        if todo.is_empty() {
            // `/` itself.
            let st = fstat(&fd).map_err(|e| TrustError::io(&resolved, e))?;
            self.check_dir(&resolved, &st, leaf != Leaf::File)?;
            if leaf == Leaf::WritableDir {
                fd = openat(CWD, "/", read_dir_flags(), Mode::empty())
                    .map_err(|e| TrustError::io(&resolved, e))?;
            }
            return Ok((fd, resolved));
        }
        while let Some(name) = todo.pop_front() {
            let last = todo.is_empty();
            if name == ".." {
                // The parent of a directory we came through was checked on the way in.
                fd = openat(&fd, "..", path_flags(), Mode::empty())
                    .map_err(|e| TrustError::io(&resolved, e))?;
                resolved.pop();
                if last {
                    return self.finish_dir(fd, resolved, leaf);
                }
                continue;
            }
            let here = resolved.join(&name);
            let st = statat(&fd, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| TrustError::io(&here, e))?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                if !trusted_owner(st.st_uid) {
                    return Err(TrustError::new(&here, Some(&st), Problem::Link));
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(TrustError::io(path, "too many symbolic links"));
                }
                let target = readlinkat(&fd, name.as_os_str(), Vec::new())
                    .map_err(|e| TrustError::io(&here, e))?;
                let target = PathBuf::from(std::ffi::OsStr::from_bytes(target.as_bytes()));
                let mut rest = components(&target);
                rest.extend(todo.drain(..));
                todo = rest;
                if target.is_absolute() {
                    fd = root().map_err(|e| TrustError::io(Path::new("/"), e))?;
                    resolved = PathBuf::from("/");
                }
                if todo.is_empty() {
                    // A link to `/`.
                    return self.finish_dir(fd, resolved, leaf);
                }
                continue;
            }
            if last && leaf == Leaf::File {
                let file = openat(
                    &fd,
                    name.as_os_str(),
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| TrustError::io(&here, e))?;
                // Checked on what was opened: a swap after the stat above changes nothing.
                let st = fstat(&file).map_err(|e| TrustError::io(&here, e))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                    return Err(TrustError::new(&here, Some(&st), Problem::Kind("a file")));
                }
                check_mode(&here, &st, true)?;
                // The file's own directory gets no sticky excuse: in a sticky directory
                // another user may still create the name before we do.
                let dir = fstat(&fd).map_err(|e| TrustError::io(&resolved, e))?;
                check_mode(&resolved, &dir, true)?;
                return Ok((file, here));
            }
            let flags = if last && leaf == Leaf::WritableDir {
                read_dir_flags()
            } else {
                path_flags()
            };
            let next = openat(&fd, name.as_os_str(), flags, Mode::empty()).map_err(|e| {
                if e == rustix::io::Errno::NOTDIR {
                    TrustError::new(&here, Some(&st), Problem::Kind("a directory"))
                } else {
                    TrustError::io(&here, e)
                }
            })?;
            let st = fstat(&next).map_err(|e| TrustError::io(&here, e))?;
            // The thing's own directory gets no sticky excuse: others could add files there.
            self.check_dir(&here, &st, last)?;
            fd = next;
            resolved = here;
        }
        Ok((fd, resolved))
    }

    /// The end of a walk that stopped on a directory reached by `..` or a link.
    fn finish_dir(
        &mut self,
        fd: OwnedFd,
        resolved: PathBuf,
        leaf: Leaf,
    ) -> Result<(OwnedFd, PathBuf), TrustError> {
        let st = fstat(&fd).map_err(|e| TrustError::io(&resolved, e))?;
        match leaf {
            Leaf::File => Err(TrustError::new(
                &resolved,
                Some(&st),
                Problem::Kind("a file"),
            )),
            Leaf::Dir => {
                self.check_dir(&resolved, &st, true)?;
                Ok((fd, resolved))
            }
            Leaf::WritableDir => {
                self.check_dir(&resolved, &st, true)?;
                let fd = openat(&fd, ".", read_dir_flags(), Mode::empty())
                    .map_err(|e| TrustError::io(&resolved, e))?;
                Ok((fd, resolved))
            }
        }
    }

    fn check_dir(&mut self, path: &Path, st: &Stat, own: bool) -> Result<(), TrustError> {
        let id = (st.st_dev, st.st_ino);
        if !own && self.trusted_dirs.contains(&id) {
            return Ok(());
        }
        check_mode(path, st, own)?;
        if !own {
            self.trusted_dirs.insert(id);
        }
        Ok(())
    }
}

/// The rule for one step; `own`: the thing itself or its own directory, where a sticky bit
/// does not excuse others' write access.
fn check_mode(path: &Path, st: &Stat, own: bool) -> Result<(), TrustError> {
    if !trusted_owner(st.st_uid) {
        return Err(TrustError::new(path, Some(st), Problem::Owner));
    }
    let sticky = st.st_mode & 0o1000 != 0;
    let dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
    if st.st_mode & 0o022 != 0 && (own || !sticky || !dir) {
        let problem = if st.st_mode & 0o002 != 0 {
            Problem::OthersWritable
        } else {
            Problem::GroupWritable
        };
        return Err(TrustError::new(path, Some(st), problem));
    }
    Ok(())
}

/// Opens a file sink's directory after checking every directory and link on the way;
/// returns its descriptor (readable, for `fsync`) and the path it resolved to.
pub fn open_dir(dir: &Path) -> Result<(OwnedFd, PathBuf), TrustError> {
    Walker::new().walk(dir, Leaf::WritableDir)
}

/// Checks one file that is read or run (see [`Walker::file`]).
pub fn check_file(path: &Path) -> Result<PathBuf, TrustError> {
    Walker::new().file(path)
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

    /// A missing file is `Missing` (the step that reads it says so in its own words), not
    /// an error text to be matched.
    #[test]
    fn a_missing_file_is_missing() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        mode(&base, 0o700);
        let e = Walker::new().file(&base.join("nope")).unwrap_err();
        assert_eq!(e.problem, Problem::Missing, "{e}");
        assert_eq!(
            e.to_string(),
            format!("{}: does not exist", base.join("nope").display())
        );
    }

    #[test]
    fn strict_modes_rules_for_directories() {
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
            assert!(
                matches!(e.problem, Problem::GroupWritable | Problem::OthersWritable),
                "{m:o}: {e}"
            );
            assert!(e.to_string().contains("chmod go-w"), "{e}");
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
        let e = open_dir(&theirs).unwrap_err();
        assert_eq!((e.problem.clone(), e.owner), (Problem::Owner, Some(65534)));
        let e = open_dir(&inner).unwrap_err();
        assert_eq!(e.path, theirs, "the ancestor is named");
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
        assert_eq!(open_dir(&evil).unwrap_err().problem, Problem::Link);
    }

    #[test]
    fn strict_modes_rules_for_files() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        mode(&base, 0o700);
        let f = base.join("key.asc");
        std::fs::write(&f, "k").unwrap();
        mode(&f, 0o644);
        assert_eq!(check_file(&f).unwrap(), f);
        for (m, p) in [
            (0o666, Problem::OthersWritable),
            (0o664, Problem::GroupWritable),
        ] {
            mode(&f, m);
            assert_eq!(check_file(&f).unwrap_err().problem, p, "{m:o}");
        }
        mode(&f, 0o600);
        std::os::unix::fs::chown(&f, Some(4242), None).unwrap();
        let e = check_file(&f).unwrap_err();
        assert_eq!((e.problem.clone(), e.owner), (Problem::Owner, Some(4242)));
        std::os::unix::fs::chown(&f, Some(0), None).unwrap();
        // A directory where a file is named, and a file in a world-writable directory
        // (sticky or not: it is the file's own directory).
        assert_eq!(
            check_file(&base).unwrap_err().problem,
            Problem::Kind("a file")
        );
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        let g = open.join("prog");
        std::fs::write(&g, "#!/bin/sh\n").unwrap();
        for m in [0o777, 0o1777] {
            mode(&open, m);
            let e = check_file(&g).unwrap_err();
            assert_eq!(
                (e.path.clone(), e.problem.clone()),
                (open.clone(), Problem::OthersWritable),
                "{m:o}"
            );
        }
        // A traverse-only ancestor is enough (the walk never reads a directory).
        mode(&open, 0o711);
        check_file(&g).unwrap();
        // A link owned by another user to a good file is not followed.
        let link = base.join("link.asc");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(check_file(&link).unwrap(), f);
        rustix::fs::chownat(
            CWD,
            &link,
            Some(rustix::process::Uid::from_raw(4242)),
            None,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        assert_eq!(check_file(&link).unwrap_err().problem, Problem::Link);
    }

    #[test]
    fn one_walker_checks_each_directory_once() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        let mut w = Walker::new();
        for i in 0..3 {
            let f = base.join(format!("f{i}"));
            std::fs::write(&f, "x").unwrap();
            w.file(&f).unwrap();
        }
        let dirs = w.trusted_dirs.len();
        // Each directory on the way once, however many files sit in it.
        assert_eq!(dirs, base.ancestors().count());
    }
}
