internal import CFuse
import Foundation
import Logging
import Synchronization
import SystemPackage
import ThinFSCore
#if canImport(Glibc)
import Glibc
#endif

// Directory listings: OPENDIR, READDIR, READDIRPLUS.

extension FUSEServer {
    func opendir(_ req: fuse_req_t, _ fi: UnsafeMutablePointer<fuse_file_info>) {
        if readOnly {
            // Nothing changes a read-only directory: the kernel may cache its listing.
            fi.pointee.cache_readdir = 1
            fi.pointee.keep_cache = 1
        }
        fuse_reply_open(req, fi)
    }

    /// READDIR: as many entries after `offset` as fit in `size` bytes; each carries its cookie.
    func readdir(_ req: fuse_req_t, _ node: fuse_ino_t, _ size: Int, _ offset: off_t) {
        buffers.withBuffer { buffer in
            let base = buffer.baseAddress!.assumingMemoryBound(to: CChar.self)
            let capacity = min(size, buffer.count)
            var used = 0
            do throws(VolumeError) {
                try volume.readdir(inode(node), after: UInt64(offset)) { entry throws(VolumeError) -> Bool in
                    var st = Glibc.stat()
                    st.st_ino = numericCast(entry.ino)
                    st.st_mode = numericCast(entry.type)
                    let n = entry.name.withCString { fuse_add_direntry(req, base + used, capacity - used, $0, &st, off_t(entry.cookie)) }
                    guard n <= capacity - used else { return false }
                    used += n
                    return true
                }
            } catch {
                // Entries already gathered are still good; the error comes back with the next call.
                if used == 0 { fail(req, "readdir", error); return }
            }
            fuse_reply_buf(req, base, used)
        }
    }

    /// READDIRPLUS: READDIR with each entry's attributes. Every entry but "." and ".." gives
    /// the kernel a lookup reference, exactly as a LOOKUP reply would.
    func readdirplus(_ req: fuse_req_t, _ node: fuse_ino_t, _ size: Int, _ offset: off_t) {
        buffers.withBuffer { buffer in
            let base = buffer.baseAddress!.assumingMemoryBound(to: CChar.self)
            let capacity = min(size, buffer.count)
            // First gather the names that fit (getattr cannot run inside the volume's readdir:
            // the volume holds its lock there), then fill in attributes.
            var listed: [DirectoryEntry] = []
            var needed = 0
            var listError: VolumeError?
            do throws(VolumeError) {
                try volume.readdir(inode(node), after: UInt64(offset)) { entry throws(VolumeError) -> Bool in
                    // With no buffer, fuse_add_direntry_plus only reports the entry's size.
                    let n = entry.name.withCString { fuse_add_direntry_plus(req, nil, 0, $0, nil, 0) }
                    guard needed + n <= capacity else { return false }
                    needed += n
                    listed.append(entry)
                    return true
                }
            } catch {
                listError = error
            }
            var used = 0
            var counted: [UInt64] = []
            for entry in listed {
                var e = fuse_entry_param()
                if entry.name == "." || entry.name == ".." {
                    // Node id 0: the kernel makes no dentry for it and holds no lookup.
                    e.attr.st_ino = numericCast(entry.ino)
                    e.attr.st_mode = numericCast(entry.type)
                } else {
                    do throws(VolumeError) {
                        e = entryParam(try volume.getattr(entry.ino))
                    } catch where error.errno == .noSuchFileOrDirectory {
                        continue  // removed since it was listed
                    } catch {
                        listError = error
                        break
                    }
                    remember(entry.ino)
                    counted.append(entry.ino)
                }
                used += entry.name.withCString { fuse_add_direntry_plus(req, base + used, capacity - used, $0, &e, off_t(entry.cookie)) }
            }
            if used == 0, let listError { fail(req, "readdirplus", listError); return }
            if fuse_reply_buf(req, base, used) != 0 {
                for ino in counted { forget(ino, 1) }
            }
        }
    }
}
