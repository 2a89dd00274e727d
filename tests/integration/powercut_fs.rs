//! An in-memory FUSE file system that simulates power loss (in the spirit of
//! LazyFS, the tool Jepsen uses), for crash-consistency tests.
//!
//! # Model
//!
//! All data lives in memory; nothing is passed through to another file system.
//! Every inode has two states:
//!
//! * **live**: what processes see right now (file contents and size, directory
//!   entries, attributes);
//! * **durable**: what survives a power cut ([`PowerCutFs::cut`]).
//!
//! Rules:
//!
//! * `write`, `truncate`/`ftruncate` (setattr size) and `fallocate` change only
//!   live data. A file's data becomes durable when that file is fsynced (FUSE
//!   `fsync`, with or without the datasync flag): the whole current content and
//!   size become durable. Only the 4 KiB pages dirtied since the previous fsync
//!   are copied, so frequent fsyncs of large files stay cheap.
//!   Writes with `O_SYNC`/`O_DSYNC` (open flag or `RWF_DSYNC`) also make the
//!   file's data durable, like a write followed by fsync. `sync_file_range(2)`,
//!   `msync` and `close` do **not** reach the file system (the kernel never
//!   forwards them to FUSE), so they make nothing durable.
//! * Directory changes (create, mknod, mkdir, unlink, rmdir, rename) change only
//!   the live tree. A directory's entry list becomes durable when that directory
//!   is fsynced (FUSE `fsyncdir`, i.e. `fsync` on an fd of the directory). For a
//!   rename across directories each side becomes durable when its own directory
//!   is fsynced. A new file whose directory entry never became durable is gone
//!   after a cut even if its data was fsynced (stricter than ext4, on purpose).
//! * [`PowerCutFs::cut`]: every directory's entries revert to its durable
//!   entries; every file's data and size revert to its durable data (a file
//!   never fsynced becomes empty); inodes that are no longer reachable from the
//!   root through durable entries are dropped. Attributes (mode, uid, gid,
//!   times) are live-only and are kept for surviving inodes. Open handles from
//!   before the cut become stale: reads, writes and fsyncs on them fail with
//!   `EIO` (closing them is fine). A cut is meant to be taken after the writers
//!   were killed.
//! * The root directory starts empty and durable.
//! * [`PowerCutFs::cut_keeping_names`]: the same, but every directory change made so far
//!   survives (names journaled, data not).
//!
//! Kernel caches cannot hide a cut: files are opened with `FOPEN_DIRECT_IO`
//! (no page cache; `mmap` of files is therefore not supported), entry and
//! attribute TTLs are zero, and the writeback cache is not enabled.
//!
//! `statfs` reports either a plausible 16 GiB file system or, in "zero" mode,
//! zero for every block and inode count and for the block sizes (as some
//! network / FUSE file systems do); see [`PowerCutFs::mount`].
//!
//! Not supported: symlinks, hard links, xattrs, special files (`ENOSYS` /
//! `EPERM`), `RENAME_EXCHANGE` and `RENAME_WHITEOUT` (`EINVAL`), fallocate
//! modes other than 0 (`EOPNOTSUPP`), `copy_file_range` (`ENOSYS`, the kernel
//! then falls back to read/write). POSIX and BSD locks are not implemented by
//! the file system, so the kernel handles `flock`/`fcntl` locks locally.
//! No permission checks are done beyond the kernel's `default_permissions`.
//!
//! The mount uses fuser's pure-Rust mount path (a direct `mount(2)` of type
//! `fuse` with an fd of `/dev/fuse`), which needs root (or `CAP_SYS_ADMIN`);
//! no libfuse or `fusermount` binary is needed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

/// Granularity of dirty tracking.
const PAGE: u64 = 4096;
/// Entry and attribute TTL: zero, so the kernel always asks us.
const TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;
/// Sizes reported by `statfs` in non-zero mode.
const STATFS_BLOCK: u64 = 4096;
const STATFS_TOTAL_BYTES: u64 = 16 << 30;
const STATFS_FILES: u64 = 1 << 20;

/// Counters for test output, see [`PowerCutFs::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Number of `fsync` requests on files.
    pub fsyncs: u64,
    /// Number of `fsyncdir` requests.
    pub fsyncdirs: u64,
    /// Number of cuts taken.
    pub cuts: u64,
    /// Bytes of file data dropped by the last cut (approximate, counted in
    /// dirty 4 KiB pages plus non-durable growth; files that disappeared count
    /// with their whole live size).
    pub bytes_dropped_last_cut: u64,
    /// Inodes (files and directories) dropped by the last cut.
    pub inodes_dropped_last_cut: u64,
}

// ---------------------------------------------------------------------------
// In-memory state
// ---------------------------------------------------------------------------

#[derive(Default)]
struct FileData {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Pages (index = offset / PAGE) written since the last fsync.
    dirty: BTreeSet<u64>,
    /// Smallest live length since the last fsync. Invariant: every byte below
    /// `min_len` that is not in a dirty page equals the durable byte, and every
    /// live byte at or above `min_len` that is not in a dirty page is zero.
    min_len: u64,
}

impl FileData {
    fn len(&self) -> u64 {
        self.live.len() as u64
    }

    fn mark_dirty(&mut self, start: u64, end: u64) {
        if end > start {
            for page in start / PAGE..=(end - 1) / PAGE {
                self.dirty.insert(page);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        let end_usize = usize::try_from(end).map_err(|_| Errno::EFBIG)?;
        let start = offset as usize;
        if start > self.live.len() {
            self.live.resize(start, 0);
        }
        // Overwrite what exists, append the rest (no zero-fill of the tail).
        let overlap = (self.live.len().min(end_usize) - start).min(data.len());
        self.live[start..start + overlap].copy_from_slice(&data[..overlap]);
        self.live.extend_from_slice(&data[overlap..]);
        self.mark_dirty(offset, end);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> Result<(), Errno> {
        let len_usize = usize::try_from(len).map_err(|_| Errno::EFBIG)?;
        self.live.resize(len_usize, 0);
        self.min_len = self.min_len.min(len);
        Ok(())
    }

    /// Makes the live content durable, copying only dirty pages.
    fn sync(&mut self) {
        copy_changes(&self.live, &mut self.durable, self.min_len, &self.dirty);
        self.dirty.clear();
        self.min_len = self.len();
    }

    /// Reverts the live content to the durable content. Returns an estimate of
    /// the bytes dropped.
    fn revert(&mut self) -> u64 {
        let live_len = self.len();
        let dur_len = self.durable.len() as u64;
        let dirty_bytes: u64 = self
            .dirty
            .iter()
            .map(|&p| (p * PAGE + PAGE).min(live_len).saturating_sub(p * PAGE))
            .sum();
        let dropped = dirty_bytes.max(live_len.saturating_sub(dur_len));

        copy_changes(&self.durable, &mut self.live, self.min_len, &self.dirty);
        self.dirty.clear();
        self.min_len = dur_len;
        dropped
    }
}

/// Makes `to` equal to `from`, given that they can differ only in `dirty`
/// pages and at or above `min_len` (see `FileData::min_len`). Copies the
/// dirty pages below the common prefix and everything from there on.
fn copy_changes(from: &[u8], to: &mut Vec<u8>, min_len: u64, dirty: &BTreeSet<u64>) {
    let keep = (min_len as usize).min(from.len()).min(to.len());
    to.truncate(keep);
    to.extend_from_slice(&from[keep..]);
    for &page in dirty {
        let start = page * PAGE;
        if start >= keep as u64 {
            break;
        }
        let (s, e) = (start as usize, ((start + PAGE) as usize).min(keep));
        to[s..e].copy_from_slice(&from[s..e]);
    }
}

#[derive(Default)]
struct DirData {
    live: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
    /// Live parent (for `..`).
    parent: u64,
}

enum Body {
    File(FileData),
    Dir(DirData),
}

struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    crtime: SystemTime,
    /// Number of live directory entries naming this inode.
    live_links: u32,
    /// Number of durable directory entries naming this inode.
    durable_links: u32,
    /// Number of open handles.
    open: u32,
}

impl Inode {
    fn new(body: Body, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = SystemTime::now();
        Inode {
            body,
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            live_links: 0,
            durable_links: 0,
            open: 0,
        }
    }

    fn kind(&self) -> FileType {
        match self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
        }
    }

    fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir(_))
    }
}

enum Handle {
    File {
        ino: u64,
    },
    Dir {
        ino: u64,
        entries: Vec<(u64, FileType, OsString)>,
    },
}

impl Handle {
    fn ino(&self) -> u64 {
        match self {
            Handle::File { ino } | Handle::Dir { ino, .. } => *ino,
        }
    }
}

struct State {
    inodes: HashMap<u64, Inode>,
    handles: HashMap<u64, Handle>,
    next_ino: u64,
    next_fh: u64,
    stats: Stats,
}

impl State {
    fn new() -> State {
        let mut inodes = HashMap::new();
        let mut root = Inode::new(
            Body::Dir(DirData {
                parent: ROOT,
                ..DirData::default()
            }),
            0o755,
            0,
            0,
        );
        root.live_links = 1;
        root.durable_links = 1;
        inodes.insert(ROOT, root);
        State {
            inodes,
            handles: HashMap::new(),
            next_ino: ROOT + 1,
            next_fh: 1,
            stats: Stats::default(),
        }
    }

    fn inode(&self, ino: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&DirData, Errno> {
        match &self.inode(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirData, Errno> {
        match &mut self.inode_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileData, Errno> {
        match &mut self.inode_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let inode = self.inode(ino)?;
        let (size, nlink) = match &inode.body {
            Body::File(f) => (f.len(), inode.live_links),
            Body::Dir(d) => {
                let subdirs = d
                    .live
                    .values()
                    .filter(|c| self.inodes.get(c).is_some_and(Inode::is_dir))
                    .count() as u32;
                let own = if inode.live_links > 0 { 2 } else { 0 };
                (4096, own + subdirs)
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: inode.atime,
            mtime: inode.mtime,
            ctime: inode.ctime,
            crtime: inode.crtime,
            kind: inode.kind(),
            perm: inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?
            .live
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    fn touch_dir(&mut self, ino: u64) {
        if let Some(inode) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            inode.mtime = now;
            inode.ctime = now;
        }
    }

    /// Creates a new inode and links it into `parent` under `name`.
    fn create_node(
        &mut self,
        parent: u64,
        name: &OsStr,
        body: Body,
        mode: u32,
        umask: u32,
        req: &Request,
    ) -> Result<u64, Errno> {
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let parent_dir = self.dir(parent)?;
        if parent_dir.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let parent_inode = self.inode(parent)?;
        if parent_inode.live_links == 0 {
            // The directory was removed while someone still had it open.
            return Err(Errno::ENOENT);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let perm = (mode & !umask & 0o7777) as u16;
        let mut inode = Inode::new(body, perm, req.uid(), req.gid());
        inode.live_links = 1;
        if let Body::Dir(d) = &mut inode.body {
            d.parent = parent;
        }
        self.inodes.insert(ino, inode);
        self.dir_mut(parent)?.live.insert(name.to_owned(), ino);
        self.touch_dir(parent);
        Ok(ino)
    }

    fn new_handle(&mut self, handle: Handle) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        if let Some(inode) = self.inodes.get_mut(&handle.ino()) {
            inode.open += 1;
        }
        self.handles.insert(fh, handle);
        fh
    }

    fn release_handle(&mut self, fh: u64) {
        if let Some(handle) = self.handles.remove(&fh) {
            let ino = handle.ino();
            if let Some(inode) = self.inodes.get_mut(&ino) {
                inode.open = inode.open.saturating_sub(1);
            }
            self.maybe_free(ino);
        }
    }

    /// Checks that `fh` is a current handle of `ino` (handles from before a cut
    /// are gone and yield `EIO`).
    fn check_handle(&self, fh: u64, ino: u64) -> Result<(), Errno> {
        match self.handles.get(&fh) {
            Some(h) if h.ino() == ino => Ok(()),
            _ => Err(Errno::EIO),
        }
    }

    /// Frees `ino` (and, for directories, whatever only it kept alive) once it
    /// is neither live-linked, durable-linked nor open.
    fn maybe_free(&mut self, ino: u64) {
        let mut work = vec![ino];
        while let Some(ino) = work.pop() {
            if ino == ROOT {
                continue;
            }
            let free = match self.inodes.get(&ino) {
                Some(i) => i.live_links == 0 && i.durable_links == 0 && i.open == 0,
                None => false,
            };
            if !free {
                continue;
            }
            if let Some(Inode {
                body: Body::Dir(d), ..
            }) = self.inodes.remove(&ino)
            {
                for child in d.durable.values().chain(d.live.values()) {
                    work.push(*child);
                }
                for child in d.durable.values() {
                    if let Some(c) = self.inodes.get_mut(child) {
                        c.durable_links = c.durable_links.saturating_sub(1);
                    }
                }
                for child in d.live.values() {
                    if let Some(c) = self.inodes.get_mut(child) {
                        c.live_links = c.live_links.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// Removes a live entry; the caller has checked the type.
    fn remove_entry(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        let ino = self
            .dir_mut(parent)?
            .live
            .remove(name)
            .ok_or(Errno::ENOENT)?;
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.live_links = inode.live_links.saturating_sub(1);
            inode.ctime = SystemTime::now();
        }
        self.touch_dir(parent);
        Ok(ino)
    }

    fn unlink(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let inode = self.inode(ino)?;
        match (&inode.body, want_dir) {
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::File(_), true) => return Err(Errno::ENOTDIR),
            (Body::Dir(d), true) if !d.live.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        self.remove_entry(parent, name)?;
        self.maybe_free(ino);
        Ok(())
    }

    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> bool {
        let mut steps = 0;
        loop {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT || steps > 100_000 {
                return false;
            }
            match self.dir(ino) {
                Ok(d) => ino = d.parent,
                Err(_) => return false,
            }
            steps += 1;
        }
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        if newname.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let src = self.lookup(parent, name)?;
        self.dir(newparent)?;
        let src_is_dir = self.inode(src)?.is_dir();
        if let Some(&dst) = self.dir(newparent)?.live.get(newname) {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if dst == src {
                return Ok(());
            }
            match (&self.inode(dst)?.body, src_is_dir) {
                (Body::Dir(_), false) => return Err(Errno::EISDIR),
                (Body::File(_), true) => return Err(Errno::ENOTDIR),
                (Body::Dir(d), true) if !d.live.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        if src_is_dir && self.is_ancestor(src, newparent) {
            return Err(Errno::EINVAL);
        }
        let replaced = self.dir(newparent)?.live.get(newname).copied();
        if replaced.is_some() {
            self.remove_entry(newparent, newname)?;
        }
        self.dir_mut(parent)?.live.remove(name);
        self.dir_mut(newparent)?
            .live
            .insert(newname.to_owned(), src);
        if let Ok(d) = self.dir_mut(src) {
            d.parent = newparent;
        }
        if let Some(inode) = self.inodes.get_mut(&src) {
            inode.ctime = SystemTime::now();
        }
        self.touch_dir(parent);
        self.touch_dir(newparent);
        if let Some(dst) = replaced {
            self.maybe_free(dst);
        }
        Ok(())
    }

    fn fsync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        let d = self.dir_mut(ino)?;
        let old = std::mem::replace(&mut d.durable, d.live.clone());
        let new: Vec<u64> = d.durable.values().copied().collect();
        for child in &new {
            if let Some(c) = self.inodes.get_mut(child) {
                c.durable_links += 1;
            }
        }
        let mut dropped = Vec::new();
        for child in old.values() {
            if let Some(c) = self.inodes.get_mut(child) {
                c.durable_links = c.durable_links.saturating_sub(1);
                dropped.push(*child);
            }
        }
        for child in dropped {
            self.maybe_free(child);
        }
        self.stats.fsyncdirs += 1;
        Ok(())
    }

    /// Every directory's live entries become durable (file data does not): the state a
    /// file system with a metadata journal and no data journal can come back in.
    fn make_names_durable(&mut self) {
        for inode in self.inodes.values_mut() {
            if let Body::Dir(d) = &mut inode.body {
                d.durable = d.live.clone();
            }
        }
        self.recount_durable_links();
    }

    fn recount_durable_links(&mut self) {
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for inode in self.inodes.values() {
            if let Body::Dir(d) = &inode.body {
                for child in d.durable.values() {
                    *counts.entry(*child).or_default() += 1;
                }
            }
        }
        for (ino, inode) in self.inodes.iter_mut() {
            let root_link = u32::from(*ino == ROOT);
            inode.durable_links = counts.get(ino).copied().unwrap_or(0) + root_link;
        }
    }

    fn cut(&mut self) {
        // 1. Reachability through durable entries, from the root. A directory
        //    reachable by two durable names (possible after a cross-directory
        //    rename of a directory where both sides were synced at different
        //    times) keeps only the first name found.
        let mut reachable: HashSet<u64> = HashSet::new();
        let mut parents: HashMap<u64, u64> = HashMap::new();
        reachable.insert(ROOT);
        parents.insert(ROOT, ROOT);
        let mut queue = vec![ROOT];
        while let Some(dir_ino) = queue.pop() {
            let entries: Vec<(OsString, u64)> = match self.dir(dir_ino) {
                Ok(d) => d.durable.iter().map(|(n, i)| (n.clone(), *i)).collect(),
                Err(_) => continue,
            };
            let mut drop_names = Vec::new();
            for (name, child) in entries {
                let child_is_dir = match self.inodes.get(&child) {
                    Some(c) => c.is_dir(),
                    None => {
                        drop_names.push(name);
                        continue;
                    }
                };
                if child_is_dir {
                    if reachable.contains(&child) {
                        drop_names.push(name);
                        continue;
                    }
                    parents.insert(child, dir_ino);
                    queue.push(child);
                }
                reachable.insert(child);
            }
            if let Ok(d) = self.dir_mut(dir_ino) {
                for name in drop_names {
                    d.durable.remove(&name);
                }
            }
        }

        // 2. Drop unreachable inodes, revert the others.
        let mut bytes_dropped = 0;
        let mut inodes_dropped = 0;
        self.inodes.retain(|ino, inode| {
            if reachable.contains(ino) {
                return true;
            }
            inodes_dropped += 1;
            if let Body::File(f) = &inode.body {
                bytes_dropped += f.len();
            }
            false
        });
        for (ino, inode) in self.inodes.iter_mut() {
            inode.open = 0;
            match &mut inode.body {
                Body::File(f) => bytes_dropped += f.revert(),
                Body::Dir(d) => {
                    d.live = d.durable.clone();
                    d.parent = parents.get(ino).copied().unwrap_or(ROOT);
                }
            }
        }
        self.recount_durable_links();
        for inode in self.inodes.values_mut() {
            inode.live_links = inode.durable_links;
        }

        // 3. Every handle from before the cut is stale.
        self.handles.clear();
        self.stats.cuts += 1;
        self.stats.bytes_dropped_last_cut = bytes_dropped;
        self.stats.inodes_dropped_last_cut = inodes_dropped;
    }
}

fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn resolve_time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

// ---------------------------------------------------------------------------
// FUSE glue
// ---------------------------------------------------------------------------

struct PowerCutFuse {
    state: Arc<Mutex<State>>,
    statfs_zero: bool,
    hold: Arc<Hold>,
}

/// A write to hold (see [`PowerCutFs::hold_write`]): armed by the test, taken by the write
/// handler, released by the test.
#[derive(Default)]
struct Hold {
    state: Mutex<HoldState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct HoldState {
    /// Armed: the name suffix of the files whose writes count, and how many to let pass first.
    armed: Option<(String, usize)>,
    held: bool,
    released: bool,
}

impl State {
    /// A live name of `ino`, if any directory has one.
    fn name_of(&self, ino: u64) -> Option<OsString> {
        self.inodes.values().find_map(|inode| match &inode.body {
            Body::Dir(d) => d
                .live
                .iter()
                .find(|(_, i)| **i == ino)
                .map(|(n, _)| n.clone()),
            Body::File(_) => None,
        })
    }
}

impl PowerCutFuse {
    /// Whether this write to `ino` is the one armed to be held (counting it if not yet).
    fn takes_hold(&self, st: &State, ino: u64) -> bool {
        let mut h = lock(&self.hold.state);
        let Some((suffix, skip)) = h.armed.as_mut() else {
            return false;
        };
        let matches = st
            .name_of(ino)
            .is_some_and(|n| n.to_string_lossy().ends_with(suffix.as_str()));
        if !matches {
            return false;
        }
        if *skip > 0 {
            *skip -= 1;
            return false;
        }
        h.armed = None;
        true
    }

    fn st(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn reply_entry(&self, ino: Result<u64, Errno>, reply: ReplyEntry) {
        let st = self.st();
        match ino.and_then(|ino| st.attr(ino)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

impl Filesystem for PowerCutFuse {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = self.st().lookup(parent.0, name);
        self.reply_entry(ino, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.st().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.st();
        let res = (|| {
            let ino = ino.0;
            if let Some(size) = size {
                st.file_mut(ino)?.set_len(size)?;
            }
            let inode = st.inode_mut(ino)?;
            let now = SystemTime::now();
            if size.is_some() {
                inode.mtime = now;
            }
            if let Some(mode) = mode {
                inode.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = uid {
                inode.uid = uid;
            }
            if let Some(gid) = gid {
                inode.gid = gid;
            }
            if let Some(t) = atime {
                inode.atime = resolve_time(t);
            }
            if let Some(t) = mtime {
                inode.mtime = resolve_time(t);
            }
            inode.ctime = ctime.unwrap_or(now);
            st.attr(ino)
        })();
        match res {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            reply.error(Errno::EPERM);
            return;
        }
        let ino = self.st().create_node(
            parent.0,
            name,
            Body::File(FileData::default()),
            mode,
            umask,
            req,
        );
        self.reply_entry(ino, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let ino = self.st().create_node(
            parent.0,
            name,
            Body::Dir(DirData::default()),
            mode,
            umask,
            req,
        );
        self.reply_entry(ino, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.st().unlink(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.st().unlink(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .st()
            .rename(parent.0, name, newparent.0, newname, flags)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        match st.inode(ino.0).map(Inode::is_dir) {
            Ok(false) => {
                let fh = st.new_handle(Handle::File { ino: ino.0 });
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            Ok(true) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut st = self.st();
        if let Err(e) = st.check_handle(fh.0, ino.0) {
            reply.error(e);
            return;
        }
        match st.file_mut(ino.0) {
            Ok(f) => {
                let len = f.len();
                let start = offset.min(len) as usize;
                let end = offset.saturating_add(u64::from(size)).min(len) as usize;
                reply.data(&f.live[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel does not send FUSE_FSYNC for O_SYNC/O_DSYNC (or
        // RWF_DSYNC) writes to direct-I/O files, but it passes those flags
        // here, so honor them.
        let sync = flags.0 & (libc::O_DSYNC | libc::O_SYNC) != 0;
        let mut st = self.st();
        let res = st
            .check_handle(fh.0, ino.0)
            .and_then(|()| st.file_mut(ino.0))
            .and_then(|f| {
                f.write(offset, data)?;
                if sync {
                    f.sync();
                }
                Ok(())
            });
        match res {
            Ok(()) => {
                if sync {
                    st.stats.fsyncs += 1;
                }
                if let Ok(inode) = st.inode_mut(ino.0) {
                    let now = SystemTime::now();
                    inode.mtime = now;
                    inode.ctime = now;
                }
                let hold = self.takes_hold(&st, ino.0);
                drop(st);
                if hold {
                    // Written (live, not durable) and not answered: the writer waits in the
                    // kernel until the test lets the answer go.
                    let mut h = lock(&self.hold.state);
                    h.held = true;
                    self.hold.changed.notify_all();
                    while !h.released {
                        h = self.hold.changed.wait(h).unwrap_or_else(|e| e.into_inner());
                    }
                }
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.st().release_handle(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let res = st
            .check_handle(fh.0, ino.0)
            .and_then(|()| st.file_mut(ino.0))
            .map(FileData::sync);
        match res {
            Ok(()) => {
                st.stats.fsyncs += 1;
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut st = self.st();
        match st.dir(ino.0) {
            Ok(_) => {
                let fh = st.new_handle(Handle::Dir {
                    ino: ino.0,
                    entries: Vec::new(),
                });
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut st = self.st();
        let snapshot = match st.dir(ino.0) {
            Ok(d) => {
                let mut v = vec![
                    (ino.0, FileType::Directory, OsString::from(".")),
                    (d.parent, FileType::Directory, OsString::from("..")),
                ];
                for (name, child) in &d.live {
                    let kind = st
                        .inodes
                        .get(child)
                        .map_or(FileType::RegularFile, Inode::kind);
                    v.push((*child, kind, name.clone()));
                }
                v
            }
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        let entries = match st.handles.get_mut(&fh.0) {
            Some(Handle::Dir {
                ino: h_ino,
                entries,
            }) if *h_ino == ino.0 => {
                if offset == 0 || entries.is_empty() {
                    *entries = snapshot;
                }
                &*entries
            }
            _ => {
                reply.error(Errno::EIO);
                return;
            }
        };
        for (i, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*child), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.st().release_handle(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.st();
        let res = st
            .check_handle(fh.0, ino.0)
            .and_then(|()| st.fsync_dir(ino.0));
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        if self.statfs_zero {
            reply.statfs(0, 0, 0, 0, 0, 0, 255, 0);
            return;
        }
        let st = self.st();
        let used: u64 = st
            .inodes
            .values()
            .map(|i| match &i.body {
                Body::File(f) => f.len().div_ceil(STATFS_BLOCK),
                Body::Dir(_) => 1,
            })
            .sum();
        let blocks = STATFS_TOTAL_BYTES / STATFS_BLOCK;
        let free = blocks.saturating_sub(used);
        let ffree = STATFS_FILES.saturating_sub(st.inodes.len() as u64);
        reply.statfs(
            blocks,
            free,
            free,
            STATFS_FILES,
            ffree,
            STATFS_BLOCK as u32,
            255,
            STATFS_BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        match self.st().inode(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.st();
        let res = st
            .create_node(
                parent.0,
                name,
                Body::File(FileData::default()),
                mode,
                umask,
                req,
            )
            .and_then(|ino| Ok((ino, st.attr(ino)?)));
        match res {
            Ok((ino, attr)) => {
                let fh = st.new_handle(Handle::File { ino });
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_DIRECT_IO,
                );
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        let mut st = self.st();
        let res = st
            .check_handle(fh.0, ino.0)
            .and_then(|()| st.file_mut(ino.0))
            .and_then(|f| {
                let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
                if end > f.len() {
                    f.set_len(end)?;
                }
                Ok(())
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let mut st = self.st();
        let res = st
            .check_handle(fh.0, ino.0)
            .and_then(|()| st.file_mut(ino.0))
            .and_then(|f| {
                let len = f.len() as i64;
                match whence {
                    libc::SEEK_DATA if offset >= 0 && offset < len => Ok(offset),
                    libc::SEEK_HOLE if offset >= 0 && offset < len => Ok(len),
                    libc::SEEK_DATA | libc::SEEK_HOLE => Err(Errno::ENXIO),
                    _ => Err(Errno::EINVAL),
                }
            });
        match res {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(e),
        }
    }
}

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// A mounted power-cut file system, served by a background thread of this
/// process.
///
/// Dropping it unmounts the file system. If the mount is busy (files still
/// open), it is force-unmounted: the FUSE connection is aborted (further I/O on
/// those files fails with `ENOTCONN`) and the mount is detached. Keep the value
/// somewhere it gets dropped (not in a `static`, not leaked): a process that
/// exits while it still has files open on its own, still-connected mount hangs
/// in the kernel at exit, because the thread that would answer is already gone.
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
    hold: Arc<Hold>,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
}

impl PowerCutFs {
    /// Mounts an empty power-cut file system at `mountpoint` (an existing
    /// empty directory), served on a background thread.
    ///
    /// With `statfs_zero`, `statfs` reports 0 for every block and inode count
    /// and for the block sizes (only `namelen` is 255); otherwise it reports a
    /// 16 GiB file system with 4 KiB blocks that is mostly free.
    pub fn mount(mountpoint: &Path, statfs_zero: bool) -> io::Result<PowerCutFs> {
        let state = Arc::new(Mutex::new(State::new()));
        let hold = Arc::new(Hold::default());
        let fs = PowerCutFuse {
            state: Arc::clone(&state),
            statfs_zero,
            hold: Arc::clone(&hold),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercutfs".to_string()),
            MountOption::Subtype("powercutfs".to_string()),
            MountOption::DefaultPermissions,
            MountOption::RW,
            MountOption::Async,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(1);
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(PowerCutFs {
            state,
            hold,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// Simulates a power cut: drops every byte and directory change that was
    /// not made durable (see the module documentation). Call it after killing
    /// the writers; handles still open become stale.
    pub fn cut(&self) {
        lock(&self.state).cut();
    }

    /// A power cut on a file system that journals names but not data (ext4's default
    /// `data=ordered` can leave this after a crash between the two, and LazyFS passes names
    /// through): every directory change made so far survives, and every file's unsynced
    /// data is dropped (a file never synced comes back empty).
    pub fn cut_keeping_names(&self) {
        let mut state = lock(&self.state);
        state.make_names_durable();
        state.cut();
    }

    /// Arms a hold: the write after the next `skip` ones to a file whose name ends with
    /// `suffix` is applied (live, not durable) and then not answered until
    /// [`PowerCutFs::release_write`]: its writer waits in the kernel, and the whole file
    /// system with it (one thread serves it), so the test can kill the writer at that exact
    /// point. Kill it with a signal first, then release (a killed writer whose request the
    /// file system already took still waits for the answer), then wait for it to exit.
    pub fn hold_write(&self, suffix: &str, skip: usize) {
        let mut h = lock(&self.hold.state);
        *h = HoldState {
            armed: Some((suffix.to_string(), skip)),
            ..HoldState::default()
        };
    }

    /// Whether the armed write is being held.
    pub fn write_held(&self) -> bool {
        lock(&self.hold.state).held
    }

    /// Lets a held write be answered (and disarms a hold not taken yet).
    pub fn release_write(&self) {
        let mut h = lock(&self.hold.state);
        h.armed = None;
        h.released = true;
        self.hold.changed.notify_all();
    }

    /// Counters for test output.
    pub fn stats(&self) -> Stats {
        lock(&self.state).stats
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        // A write still held would keep its writer, and the unmount, waiting.
        self.release_write();
        let unmounted = self
            .session
            .take()
            .is_some_and(|session| session.umount_and_join().is_ok());
        if unmounted {
            return;
        }
        // Busy (some process still has files open there): MNT_FORCE makes
        // the kernel abort the FUSE connection (pending and later requests on
        // the mount fail with ENOTCONN instead of waiting for us, so nobody,
        // including this process at exit, can hang on it) and MNT_DETACH frees
        // the mount point. The session thread then ends on its own.
        force_unmount(&self.mountpoint);
    }
}

#[allow(unsafe_code)]
fn force_unmount(mountpoint: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call;
    // umount2 has no other memory-safety preconditions.
    let _ = unsafe { libc::umount2(path.as_ptr(), libc::MNT_FORCE | libc::MNT_DETACH) };
}

/// Says whether FUSE mounts are possible here: `/dev/fuse` must exist and be
/// openable, and a test mount in a temporary directory must succeed.
pub fn fuse_available() -> Result<(), String> {
    let dev = Path::new("/dev/fuse");
    if !dev.exists() {
        return Err(
            "/dev/fuse does not exist (no FUSE support in this kernel/container; \
                    try `modprobe fuse` or run the container with --device /dev/fuse)"
                .to_string(),
        );
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return Err(format!("cannot open /dev/fuse read-write: {e}"));
    }
    static PROBE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("powercut-fs-probe-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create probe mount point {}: {e}", dir.display()))?;
    let result = match PowerCutFs::mount(&dir, false) {
        Ok(fs) => {
            let probe = dir.join("probe");
            let res = std::fs::write(&probe, b"ok")
                .and_then(|()| std::fs::read(&probe))
                .map_err(|e| format!("FUSE mount succeeded but I/O on it failed: {e}"))
                .and_then(|data| {
                    if data == b"ok" {
                        Ok(())
                    } else {
                        Err("FUSE mount succeeded but read back wrong data".to_string())
                    }
                });
            drop(fs);
            res
        }
        Err(e) => Err(format!(
            "mounting a FUSE file system failed: {e} (mount(2) of type fuse needs root or \
             CAP_SYS_ADMIN; without them a setuid fusermount3 binary would be needed)"
        )),
    };
    let _ = std::fs::remove_dir(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random writes/truncates/syncs/reverts against a naive model.
    #[test]
    fn dirty_page_tracking_matches_model() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _round in 0..200 {
            let mut f = FileData::default();
            let mut live: Vec<u8> = Vec::new();
            let mut durable: Vec<u8> = Vec::new();
            for step in 0..60u64 {
                match rnd(10) {
                    0..=4 => {
                        let off = rnd(40_000);
                        let len = rnd(10_000) as usize;
                        let data = vec![(step % 250 + 1) as u8; len];
                        f.write(off, &data).unwrap();
                        let end = off as usize + len;
                        if live.len() < end {
                            live.resize(end, 0);
                        }
                        live[off as usize..end].copy_from_slice(&data);
                    }
                    5 | 6 => {
                        let len = rnd(50_000);
                        f.set_len(len).unwrap();
                        live.resize(len as usize, 0);
                    }
                    7 | 8 => {
                        f.sync();
                        durable = live.clone();
                    }
                    _ => {
                        f.revert();
                        live = durable.clone();
                    }
                }
                assert_eq!(f.live, live);
                assert_eq!(f.durable, durable);
            }
        }
    }
}
