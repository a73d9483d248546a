internal import CFuse
import Foundation
import Logging
import Synchronization
import SystemPackage
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

// INIT (the capabilities this server asks for) and the `fuse_lowlevel_ops` table that routes
// each request to its handler.

extension FUSEServer {
    // MARK: Operations

    /// The kernel's limit on background requests in flight for `threads` workers: three quarters of
    /// them (at least 1), so that a quarter is left for requests a process waits on.
    static func maxBackground(threads: Int) -> Int { max(1, max(threads, 1) * 3 / 4) }

    func initialize(_ conn: UnsafeMutablePointer<fuse_conn_info>) {
        let capable = conn.pointee.capable
        // max_pages follows max_write: libfuse sets it in the INIT reply when the kernel offers FUSE_MAX_PAGES.
        conn.pointee.max_write = UInt32(Self.maxIO)
        conn.pointee.max_read = UInt32(Self.maxIO)
        // Background requests (writeback WRITEs, read-ahead) stay below the worker threads, so that
        // a synchronous request always finds a thread. A writer's GETXATTR before each write(2) used
        // to wait behind up to 64 queued WRITEs (docs/benchmarks.md, "Issue 11's goals, session 12").
        conn.pointee.max_background = UInt32(Self.maxBackground(threads: options.maxThreads))
        if let kib = options.effectiveReadAheadKiB {
            // The kernel sets the mount's read-ahead to the smaller of the backing device's value and
            // ours when it processes this reply, so the device's value is raised first, here.
            if let device = state.withLock({ $0.device }), Self.setReadAhead(kib: kib, device: device) {
                conn.pointee.max_readahead = UInt32(kib * 1024)
            } else {
                logger.debug("could not raise read-ahead", metadata: ["fuse.mountpoint": "\(mountpoint)"])
            }
        }
        conn.pointee.congestion_threshold = UInt32(max(1, Self.maxBackground(threads: options.maxThreads) * 3 / 4))
        var want = conn.pointee.want
        // The volume does not clear set-user-ID bits on write or chown: let the kernel do it (with a setattr).
        want &= ~UInt32(FUSE_CAP_HANDLE_KILLPRIV)
        // Without it the kernel truncates with a setattr before open, and open never sees O_TRUNC.
        want &= ~UInt32(FUSE_CAP_ATOMIC_O_TRUNC)
        want &= ~UInt32(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE)
        // Write-back caching lets the kernel merge small writes into max_write requests. It is safe on a
        // read-write mount because every change comes through this kernel; a read-only mount has no writes.
        if !readOnly, capable & UInt32(FUSE_CAP_WRITEBACK_CACHE) != 0 { want |= UInt32(FUSE_CAP_WRITEBACK_CACHE) }
        // libfuse turns on auto_inval_data by default: the kernel then refreshes a file's attributes
        // before every read() once they are older than the attr timeout (a GETATTR round trip per
        // second of a long read on rw mounts), to drop cached pages when another client changed the
        // file. Nothing else changes our files: a read-only mount never changes, and with the writeback
        // cache the kernel ignores our size and mtime for regular files anyway. The kernel still asks
        // for the size when a read reaches past the cached EOF.
        want &= ~UInt32(FUSE_CAP_AUTO_INVAL_DATA)
        // A symlink's target never changes (a new target is a new inode), so the page cache may keep it.
        if capable & UInt32(FUSE_CAP_CACHE_SYMLINKS) != 0 { want |= UInt32(FUSE_CAP_CACHE_SYMLINKS) }
        // No OPEN or RELEASE per file (see FUSEServer, "Opens"). libfuse reports the capability in
        // `capable`; there is nothing to ask for in `want`: the first OPEN's ENOSYS turns it on.
        // Directories keep OPENDIR: without it the kernel caches every listing (FOPEN_CACHE_DIR),
        // which only a read-only mount may, and OPENDIR and RELEASEDIR do no work here anyway.
        if options.effectiveOpensInKernel, capable & UInt32(FUSE_CAP_NO_OPEN_SUPPORT) != 0 {
            opensInKernel.store(true, ordering: .relaxed)
        }
        conn.pointee.want = want & capable
        logger.debug("FUSE INIT", metadata: [
            "fuse.proto": "\(conn.pointee.proto_major).\(conn.pointee.proto_minor)",
            "fuse.want": "\(String(conn.pointee.want, radix: 16))", "fuse.capable": "\(String(capable, radix: 16))",
            "fuse.max_write": "\(conn.pointee.max_write)", "fuse.opens_in_kernel": "\(opensInKernel.load(ordering: .relaxed))",
        ])
    }

    // MARK: The operation table

    static func server(_ req: fuse_req_t) -> FUSEServer {
        Unmanaged<FUSEServer>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }

    /// Runs a request's handler on its server (the request's user data). libfuse never passes
    /// a NULL request, so the one unwrap is here rather than in every entry of the table.
    static func serve(_ req: fuse_req_t?, _ handler: (FUSEServer, fuse_req_t) -> Void) {
        handler(server(req!), req!)
    }

    /// The `fuse_lowlevel_ops` table. libfuse copies it in fuse_session_new; each entry is a
    /// C function that finds the server through the request's user data.
    static func operations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let userdata, let conn else { return }
            Unmanaged<FUSEServer>.fromOpaque(userdata).takeUnretainedValue().initialize(conn)
        }
        ops.lookup = { req, parent, name in FUSEServer.serve(req) { $0.lookup($1, parent, FUSEServer.string(name)) } }
        ops.forget = { req, node, nlookup in
            FUSEServer.serve(req) { s, req in
                s.forget(s.inode(node), nlookup)
                fuse_reply_none(req)
            }
        }
        ops.forget_multi = { req, count, forgets in
            FUSEServer.serve(req) { s, req in
                if let forgets {
                    for f in UnsafeBufferPointer(start: forgets, count: count) { s.forget(s.inode(f.ino), f.nlookup) }
                }
                fuse_reply_none(req)
            }
        }
        ops.getattr = { req, node, _ in FUSEServer.serve(req) { $0.getattr($1, node) } }
        ops.setattr = { req, node, attr, toSet, _ in FUSEServer.serve(req) { $0.setattr($1, node, attr, toSet) } }
        ops.readlink = { req, node in FUSEServer.serve(req) { $0.readlink($1, node) } }
        ops.mknod = { req, parent, name, mode, rdev in FUSEServer.serve(req) { $0.mknod($1, parent, FUSEServer.string(name), mode, rdev) } }
        ops.mkdir = { req, parent, name, mode in FUSEServer.serve(req) { $0.mkdir($1, parent, FUSEServer.string(name), mode) } }
        ops.unlink = { req, parent, name in FUSEServer.serve(req) { $0.unlink($1, parent, FUSEServer.string(name)) } }
        ops.rmdir = { req, parent, name in FUSEServer.serve(req) { $0.rmdir($1, parent, FUSEServer.string(name)) } }
        ops.symlink = { req, target, parent, name in FUSEServer.serve(req) { $0.symlink($1, FUSEServer.string(target), parent, FUSEServer.string(name)) } }
        ops.rename = { req, parent, name, newParent, newName, flags in
            FUSEServer.serve(req) { $0.rename($1, parent, FUSEServer.string(name), newParent, FUSEServer.string(newName), flags) }
        }
        ops.link = { req, node, newParent, newName in FUSEServer.serve(req) { $0.link($1, node, newParent, FUSEServer.string(newName)) } }
        ops.open = { req, node, fi in FUSEServer.serve(req) { $0.open($1, node, fi!) } }
        ops.read = { req, node, size, offset, _ in FUSEServer.serve(req) { $0.read($1, node, size, offset) } }
        ops.write = { req, node, data, size, offset, _ in FUSEServer.serve(req) { $0.write($1, node, data, size, offset) } }
        // FLUSH (every close(2)) has nothing to do here: data reaches the volume on WRITE, and
        // durability is fsync's. ENOSYS says so once: the kernel sets no_flush and stops sending
        // FLUSH for the life of the mount, a round trip less per close. It still writes a closing
        // file's dirty pages back before close returns (fuse_flush: write_inode_now comes before
        // the no_flush test), so close keeps reporting write-back errors.
        ops.flush = { req, _, _ in fuse_reply_err(req, ENOSYS) }
        ops.release = { req, node, _ in FUSEServer.serve(req) { $0.release($1, node) } }
        ops.fsync = { req, node, _, _ in FUSEServer.serve(req) { $0.fsync($1, node) } }
        ops.opendir = { req, _, fi in FUSEServer.serve(req) { $0.opendir($1, fi!) } }
        ops.readdir = { req, node, size, offset, _ in FUSEServer.serve(req) { $0.readdir($1, node, size, offset) } }
        ops.readdirplus = { req, node, size, offset, _ in FUSEServer.serve(req) { $0.readdirplus($1, node, size, offset) } }
        ops.releasedir = { req, _, _ in fuse_reply_err(req, 0) }
        ops.fsyncdir = { req, node, _, _ in FUSEServer.serve(req) { $0.fsync($1, node) } }
        ops.statfs = { req, _ in FUSEServer.serve(req) { $0.statfs($1) } }
        ops.setxattr = { req, node, name, value, size, flags in
            FUSEServer.serve(req) { $0.setxattr($1, node, FUSEServer.string(name), value, size, flags) }
        }
        ops.getxattr = { req, node, name, size in FUSEServer.serve(req) { $0.getxattr($1, node, FUSEServer.string(name), size) } }
        ops.listxattr = { req, node, size in FUSEServer.serve(req) { $0.listxattr($1, node, size) } }
        ops.removexattr = { req, node, name in FUSEServer.serve(req) { $0.removexattr($1, node, FUSEServer.string(name)) } }
        ops.create = { req, parent, name, mode, fi in FUSEServer.serve(req) { $0.create($1, parent, FUSEServer.string(name), mode, fi!) } }
        ops.fallocate = { req, node, mode, offset, length, _ in FUSEServer.serve(req) { $0.fallocate($1, node, mode, offset, length) } }
        ops.lseek = { req, node, offset, whence, _ in FUSEServer.serve(req) { $0.lseek($1, node, offset, whence) } }
        return ops
    }
}
