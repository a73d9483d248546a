internal import CFuse
import Foundation
import Logging
import Synchronization
import SystemPackage
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

// LOOKUP, GETATTR, SETATTR, READLINK and the operations that change names: MKNOD, MKDIR,
// SYMLINK, LINK, UNLINK, RMDIR, RENAME.

extension FUSEServer {
    func lookup(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String) {
        do {
            replyEntry(req, try volume.lookup(parent: inode(parent), name: name))
        } catch where error.errno == .noSuchFileOrDirectory {
            // A negative entry: the kernel may remember the name's absence for the timeout.
            var e = fuse_entry_param()
            e.entry_timeout = cacheTimeout
            fuse_reply_entry(req, &e)
        } catch {
            fail(req, "lookup", error)
        }
    }

    func getattr(_ req: fuse_req_t, _ node: fuse_ino_t) {
        getattrRequests.add(1, ordering: .relaxed)
        do { replyAttr(req, try volume.getattr(inode(node))) } catch { fail(req, "getattr", error) }
    }

    func setattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ attr: UnsafeMutablePointer<stat>?, _ toSet: Int32) {
        guard writable(req) else { return }
        guard let attr else { fuse_reply_err(req, EINVAL); return }
        var c = AttributeChanges()
        if toSet & FUSE_SET_ATTR_MODE != 0 { c.mode = numericCast(attr.pointee.st_mode) }
        if toSet & FUSE_SET_ATTR_UID != 0 { c.uid = numericCast(attr.pointee.st_uid) }
        if toSet & FUSE_SET_ATTR_GID != 0 { c.gid = numericCast(attr.pointee.st_gid) }
        if toSet & FUSE_SET_ATTR_SIZE != 0 { c.size = numericCast(attr.pointee.st_size) }
        if toSet & FUSE_SET_ATTR_ATIME_NOW != 0 {
            c.atime = .now
        } else if toSet & FUSE_SET_ATTR_ATIME != 0 {
            c.atime = .set(Self.timestamp(attr.pointee.st_atim))
        }
        if toSet & FUSE_SET_ATTR_MTIME_NOW != 0 {
            c.mtime = .now
        } else if toSet & FUSE_SET_ATTR_MTIME != 0 {
            c.mtime = .set(Self.timestamp(attr.pointee.st_mtim))
        }
        if toSet & FUSE_SET_ATTR_CTIME != 0 { c.ctime = Self.timestamp(attr.pointee.st_ctim) }
        do { replyAttr(req, try volume.setattr(inode(node), c)) } catch { fail(req, "setattr", error) }
    }

    func readlink(_ req: fuse_req_t, _ node: fuse_ino_t) {
        do { fuse_reply_readlink(req, try volume.readlink(inode(node))) } catch { fail(req, "readlink", error) }
    }

    func mknod(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String, _ mode: mode_t, _ rdev: dev_t) {
        guard writable(req) else { return }
        do {
            replyEntry(req, try volume.mknod(parent: inode(parent), name: name, mode: numericCast(mode), rdev: numericCast(rdev),
                                             owner: Self.owner(req)))
        } catch { fail(req, "mknod", error) }
    }

    func mkdir(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String, _ mode: mode_t) {
        guard writable(req) else { return }
        do {
            replyEntry(req, try volume.mkdir(parent: inode(parent), name: name, mode: numericCast(mode) & 0o7777, owner: Self.owner(req)))
        } catch { fail(req, "mkdir", error) }
    }

    func symlink(_ req: fuse_req_t, _ target: String, _ parent: fuse_ino_t, _ name: String) {
        guard writable(req) else { return }
        do {
            replyEntry(req, try volume.symlink(parent: inode(parent), name: name, target: target, owner: Self.owner(req)))
        } catch { fail(req, "symlink", error) }
    }

    func link(_ req: fuse_req_t, _ node: fuse_ino_t, _ newParent: fuse_ino_t, _ newName: String) {
        guard writable(req) else { return }
        do {
            replyEntry(req, try volume.link(inode(node), newParent: inode(newParent), newName: newName))
        } catch { fail(req, "link", error) }
    }

    func unlink(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String) {
        guard writable(req) else { return }
        do {
            try volume.unlink(parent: inode(parent), name: name)
            fuse_reply_err(req, 0)
        } catch { fail(req, "unlink", error) }
    }

    func rmdir(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String) {
        guard writable(req) else { return }
        do {
            try volume.rmdir(parent: inode(parent), name: name)
            fuse_reply_err(req, 0)
        } catch { fail(req, "rmdir", error) }
    }

    func rename(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String, _ newParent: fuse_ino_t, _ newName: String, _ flags: UInt32) {
        guard writable(req) else { return }
        let known: RenameFlags = [.noReplace, .exchange]
        let f = RenameFlags(rawValue: flags)
        // rename(2): EINVAL for an unknown flag (RENAME_WHITEOUT included), or for NOREPLACE with EXCHANGE.
        guard known.isSuperset(of: f), f != known else { fuse_reply_err(req, EINVAL); return }
        do {
            try volume.rename(parent: inode(parent), name: name, newParent: inode(newParent), newName: newName, flags: f)
            fuse_reply_err(req, 0)
        } catch { fail(req, "rename", error) }
    }
}
