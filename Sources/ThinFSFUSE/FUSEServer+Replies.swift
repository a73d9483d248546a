internal import CFuse
import Foundation
import Logging
import Synchronization
import SystemPackage
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

// What every handler shares: errno mapping, conversions between the volume's types and
// libfuse's, lookup counts, entry and attribute replies.

extension FUSEServer {
    // MARK: Errors

    /// The one place a Swift error becomes the errno given to fuse_reply_err(3).
    ///
    /// - `VolumeError` carries the errno a kernel filesystem returns in the same situation
    ///   (the ERRORS sections of open(2), rename(2), unlink(2), setxattr(2), fallocate(2)...).
    /// - ENOSYS becomes EOPNOTSUPP. The FUSE kernel module reads ENOSYS as "this filesystem
    ///   lacks the operation" and never sends it again for the life of the mount (fallocate,
    ///   lseek, xattrs, rename2 and others). EOPNOTSUPP is what fallocate(2) and the xattr
    ///   calls document for an unsupported mode or namespace.
    /// - Anything else goes through the mapping libext2fs's callbacks and the Volume use too
    ///   (`Errno(reporting:)`): a device error's EIO, ENOSPC or EROFS, and EIO (errno(3):
    ///   "Input/output error") for what no subsystem maps, as a kernel filesystem reports a
    ///   failure of the layer below it.
    static func errnoCode(for error: any Swift.Error) -> Int32 {
        let code = Errno(reporting: error).rawValue
        if code == ENOSYS { return EOPNOTSUPP }
        return code > 0 ? code : EIO
    }

    /// For modifying requests: EROFS on a read-only mount; otherwise notes that a commit is due.
    func writable(_ req: fuse_req_t) -> Bool {
        guard !readOnly else {
            fuse_reply_err(req, EROFS)
            return false
        }
        changed.store(true, ordering: .releasing)
        return true
    }

    func fail(_ req: fuse_req_t, _ op: StaticString, _ error: any Swift.Error) {
        let code = Self.errnoCode(for: error)
        if code == EIO {
            logger.info("FUSE request failed", metadata: ["fuse.op": "\(op)", "fuse.error": "\(error)"])
        } else {
            logger.debug("FUSE request failed", metadata: ["fuse.op": "\(op)", "fuse.error": "\(error)"])
        }
        fuse_reply_err(req, code)
    }

    // MARK: Conversions

    @inline(__always) func inode(_ node: fuse_ino_t) -> UInt64 { node == UInt64(FUSE_ROOT_ID) ? rootInode : node }
    @inline(__always) private func nodeID(_ ino: UInt64) -> fuse_ino_t { ino == rootInode ? fuse_ino_t(FUSE_ROOT_ID) : ino }

    private static func stat(of a: FileAttributes) -> stat {
        var st = Glibc.stat()
        st.st_ino = numericCast(a.ino)
        st.st_mode = numericCast(a.mode)
        st.st_nlink = numericCast(a.nlink)
        st.st_uid = numericCast(a.uid)
        st.st_gid = numericCast(a.gid)
        st.st_rdev = numericCast(a.rdev)
        st.st_size = numericCast(a.size)
        st.st_blocks = numericCast(a.blocks)
        st.st_blksize = numericCast(a.blockSize)
        st.st_atim = timespec(a.atime)
        st.st_mtim = timespec(a.mtime)
        st.st_ctim = timespec(a.ctime)
        return st
    }

    static func timespec(_ t: Timestamp) -> Glibc.timespec {
        Glibc.timespec(tv_sec: numericCast(t.seconds), tv_nsec: numericCast(t.nanoseconds))
    }

    static func timestamp(_ t: Glibc.timespec) -> Timestamp {
        Timestamp(seconds: numericCast(t.tv_sec), nanoseconds: numericCast(t.tv_nsec))
    }

    func entryParam(_ a: FileAttributes) -> fuse_entry_param {
        var e = fuse_entry_param()
        e.ino = nodeID(a.ino)
        e.generation = UInt64(a.generation)
        e.attr = Self.stat(of: a)
        e.attr_timeout = cacheTimeout
        e.entry_timeout = cacheTimeout
        return e
    }

    static func owner(_ req: fuse_req_t) -> Owner {
        guard let ctx = fuse_req_ctx(req) else { return .root }
        return Owner(uid: ctx.pointee.uid, gid: ctx.pointee.gid)
    }

    static func string(_ p: UnsafePointer<CChar>?) -> String { p.map { String(cString: $0) } ?? "" }

    // MARK: Lookup counts

    /// Counts a lookup the kernel is about to hold. Called before the reply is sent: the
    /// kernel may send FORGET as soon as it has the reply.
    func remember(_ ino: UInt64) {
        guard ino != rootInode else { return }
        let first = lookups.withLock { counts -> Bool in
            counts[ino, default: 0] += 1
            return counts[ino] == 1
        }
        // Before the reply too: the FORGET that ends this reference reaches the volume after it.
        if first, opensInKernel.load(ordering: .relaxed) { volume.remember(ino) }
    }

    /// Drops `n` lookups; at zero the volume may free an unlinked inode.
    func forget(_ ino: UInt64, _ n: UInt64) {
        guard ino != rootInode else { return }
        let last = lookups.withLock { counts -> Bool in
            guard let c = counts[ino] else { return false }
            if c <= n {
                counts[ino] = nil
                return true
            }
            counts[ino] = c - n
            return false
        }
        if last { volume.forget(ino) }
    }

    /// Drops every lookup, as the end of the connection does.
    func forgetAll() {
        let known = lookups.withLock { counts -> [UInt64] in
            defer { counts = [:] }
            return Array(counts.keys)
        }
        for ino in known { volume.forget(ino) }
    }

    /// The kernel's lookup count of `ino` (tests).
    func lookupCount(_ ino: UInt64) -> UInt64 { lookups.withLock { $0[ino] ?? 0 } }

    func replyEntry(_ req: fuse_req_t, _ a: FileAttributes) {
        var e = entryParam(a)
        remember(a.ino)
        // A failed reply (the request was interrupted) reached no one: take the count back.
        if fuse_reply_entry(req, &e) != 0 { forget(a.ino, 1) }
    }

    func replyAttr(_ req: fuse_req_t, _ a: FileAttributes) {
        var st = Self.stat(of: a)
        fuse_reply_attr(req, &st, cacheTimeout)
    }
}
