internal import CFuse
import Foundation
import Logging
import Synchronization
import SystemPackage
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

// Extended attributes: SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR.

extension FUSEServer {
    func setxattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ name: String, _ value: UnsafePointer<CChar>?, _ size: Int, _ flags: Int32) {
        guard writable(req) else { return }
        let bytes = [UInt8](UnsafeRawBufferPointer(start: value, count: value == nil ? 0 : size))
        do {
            try volume.setxattr(inode(node), name: name, value: bytes, flags: XattrFlags(rawValue: flags))
            // Before the reply, so that a stat right after setxattr returns cannot see the old mode.
            if name == "system.posix_acl_access" { invalidateAttributes(node) }
            fuse_reply_err(req, 0)
        } catch { fail(req, "setxattr", error) }
    }

    /// An access ACL changes the mode bits, which the kernel cached without knowing (FUSE_CAP_POSIX_ACL
    /// is off, so it treats the ACL as an opaque xattr): tell it to drop the cached attributes
    /// (a negative offset invalidates attributes only, fuse_lowlevel.h). Attribute-only
    /// invalidation takes no inode or page lock in the kernel, so it is safe while the
    /// setxattr request is still pending.
    func invalidateAttributes(_ node: fuse_ino_t) {
        guard let session = state.withLock({ $0.session }) else { return }
        _ = fuse_lowlevel_notify_inval_inode(session.pointer, node, -1, 0)
    }

    /// getxattr(2)/listxattr(2): a size of 0 asks how big the value is; a smaller buffer is ERANGE.
    func replyXattr(_ req: fuse_req_t, _ bytes: [UInt8], _ size: Int) {
        if size == 0 {
            fuse_reply_xattr(req, bytes.count)
        } else if bytes.count > size {
            fuse_reply_err(req, ERANGE)
        } else {
            _ = bytes.withUnsafeBytes { fuse_reply_buf(req, $0.baseAddress?.assumingMemoryBound(to: CChar.self), $0.count) }
        }
    }

    func getxattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ name: String, _ size: Int) {
        do { replyXattr(req, try volume.getxattr(inode(node), name: name), size) } catch { fail(req, "getxattr", error) }
    }

    func listxattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ size: Int) {
        do {
            // listxattr(2): the names, each followed by a NUL.
            let names = try volume.listxattr(inode(node))
            replyXattr(req, names.flatMap { Array($0.utf8) + [0] }, size)
        } catch { fail(req, "listxattr", error) }
    }

    func removexattr(_ req: fuse_req_t, _ node: fuse_ino_t, _ name: String) {
        guard writable(req) else { return }
        do {
            try volume.removexattr(inode(node), name: name)
            fuse_reply_err(req, 0)
        } catch { fail(req, "removexattr", error) }
    }
}
