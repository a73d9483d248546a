internal import CFuse
import Foundation
import Logging
import Synchronization
import SystemPackage
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

// File data: OPEN, CREATE, READ, WRITE, RELEASE, FSYNC, FALLOCATE, LSEEK, and STATFS.

extension FUSEServer {
    func open(_ req: fuse_req_t, _ node: fuse_ino_t, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        openRequests.add(1, ordering: .relaxed)
        // "Opened": the kernel sets no_open and opens every regular file itself from now on,
        // this one included (fs/fuse/file.c, fuse_file_open). A read-only mount is mounted `ro`,
        // so the VFS refuses a write open with EROFS before any OPEN.
        if opensInKernel.load(ordering: .relaxed) { fuse_reply_err(req, ENOSYS); return }
        if readOnly, fi.pointee.flags & O_ACCMODE != O_RDONLY { fuse_reply_err(req, EROFS); return }
        let ino = inode(node)
        do { try volume.open(ino) } catch { fail(req, "open", error); return }
        fi.pointee.direct_io = 0
        // Keep cached pages across opens. A read-only layer never changes; a read-write mount
        // is changed only through this kernel mount (the daemon holds the pool's writer lock,
        // and the volume has no other writer), so the kernel's pages are the truth there too.
        fi.pointee.keep_cache = 1
        // fuse_reply_open(3): when the reply fails, release is never called for this open.
        if fuse_reply_open(req, fi) != 0 { volume.release(ino) }
    }

    func create(_ req: fuse_req_t, _ parent: fuse_ino_t, _ name: String, _ mode: mode_t, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        guard writable(req) else { return }
        let typed = mode & S_IFMT == 0 ? mode | S_IFREG : mode
        // With opens in the kernel the inode lives by its lookup count (`remember`), and this
        // open is not counted: kernels before 6.9 send no RELEASE for it once no_open is set.
        let counted = !opensInKernel.load(ordering: .relaxed)
        do {
            let a = try volume.mknod(parent: inode(parent), name: name, mode: numericCast(typed), rdev: 0, owner: Self.owner(req))
            if counted { try volume.open(a.ino) }
            fi.pointee.direct_io = 0
            fi.pointee.keep_cache = 1
            var e = entryParam(a)
            remember(a.ino)
            if fuse_reply_create(req, &e, fi) != 0 {
                if counted { volume.release(a.ino) }
                forget(a.ino, 1)
            }
        } catch { fail(req, "create", error) }
    }

    func read(_ req: fuse_req_t, _ node: fuse_ino_t, _ size: Int, _ offset: off_t) {
        buffers.withBuffer { buffer in
            let want = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<min(size, buffer.count)])
            do {
                let n = try volume.read(inode(node), at: UInt64(offset), into: want)
                readRequests.add(1, ordering: .relaxed)
                readBytes.add(UInt64(n), ordering: .relaxed)
                fuse_reply_buf(req, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), n)
            } catch { fail(req, "read", error) }
        }
    }

    func write(_ req: fuse_req_t, _ node: fuse_ino_t, _ data: UnsafePointer<CChar>?, _ size: Int, _ offset: off_t) {
        guard writable(req) else { return }
        do {
            let n = try volume.write(inode(node), at: UInt64(offset), from: UnsafeRawBufferPointer(start: data, count: size))
            fuse_reply_write(req, n)
        } catch { fail(req, "write", error) }
    }

    func release(_ req: fuse_req_t, _ node: fuse_ino_t) {
        releaseRequests.add(1, ordering: .relaxed)
        // With opens in the kernel only a created file is released (CREATE counted no open).
        if !opensInKernel.load(ordering: .relaxed) { volume.release(inode(node)) }
        fuse_reply_err(req, 0)
    }

    func fsync(_ req: fuse_req_t, _ node: fuse_ino_t?) {
        // A read-only volume has nothing to make durable.
        guard !readOnly else { fuse_reply_err(req, 0); return }
        do {
            try volume.fsync(node.map(inode))
            fuse_reply_err(req, 0)
        } catch { fail(req, "fsync", error) }
    }

    func statfs(_ req: fuse_req_t) {
        do {
            let s = try volume.statfs()
            var v = statvfs()
            v.f_bsize = numericCast(s.blockSize)
            v.f_frsize = numericCast(s.blockSize)
            v.f_blocks = numericCast(s.blocks)
            v.f_bfree = numericCast(s.freeBlocks)
            v.f_bavail = numericCast(s.availableBlocks)
            v.f_files = numericCast(s.files)
            v.f_ffree = numericCast(s.freeFiles)
            v.f_favail = numericCast(s.freeFiles)
            v.f_namemax = numericCast(s.nameMax)
            fuse_reply_statfs(req, &v)
        } catch { fail(req, "statfs", error) }
    }

    func fallocate(_ req: fuse_req_t, _ node: fuse_ino_t, _ mode: Int32, _ offset: off_t, _ length: off_t) {
        guard writable(req) else { return }
        guard offset >= 0, length > 0 else { fuse_reply_err(req, EINVAL); return }
        do {
            try volume.fallocate(inode(node), mode: FallocateMode(rawValue: mode), offset: UInt64(offset), length: UInt64(length))
            fuse_reply_err(req, 0)
        } catch { fail(req, "fallocate", error) }
    }

    func lseek(_ req: fuse_req_t, _ node: fuse_ino_t, _ offset: off_t, _ whence: Int32) {
        let target: SeekTarget
        switch whence {
        case Self.seekData: target = .data
        case Self.seekHole: target = .hole
        // The kernel answers SEEK_SET/CUR/END itself and only forwards these two. EINVAL, not
        // ENOSYS: ENOSYS would make it stop forwarding SEEK_DATA/SEEK_HOLE too.
        default: fuse_reply_err(req, EINVAL); return
        }
        guard offset >= 0 else { fuse_reply_err(req, ENXIO); return }
        do {
            fuse_reply_lseek(req, off_t(try volume.seek(inode(node), from: UInt64(offset), to: target)))
        } catch { fail(req, "lseek", error) }
    }
}
