internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

// Namespace operations: setattr, mknod, mkdir, symlink, link, unlink, rmdir and rename.

extension Volume {
    // MARK: FileSystemVolume: changing

    public func setattr(_ ino: UInt64, _ changes: AttributeChanges) throws(VolumeError) -> FileAttributes {
        try requireWritable("setattr")
        // A size change frees or zeroes a file's blocks: not under a write in flight (WritesInFlight.swift).
        return try (changes.size != nil ? withQuiescedFS : withFS) { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            let now = Self.now()
            if let size = changes.size {
                guard UInt32(inode.i_mode) & 0o170000 == 0o100000 else {
                    throw VolumeError(UInt32(inode.i_mode) & 0o170000 == 0o040000 ? .isDirectory : .invalidArgument,
                                      "truncate of inode \(ino), which is not a regular file")
                }
                // The blocks past the new end go first, through `punch` (see there): the truncate
                // below would punch them with libext2fs's own, which may refuse the last block.
                let bs = UInt64(fs.pointee.blocksize)
                if size < fileSize(inode) {
                    try check(punch(fs, ino, &inode, (size + bs - 1) / bs, ~0), "truncating inode \(ino) to \(size)")
                }
                let file = try openFile(fs, ino, write: true)
                let rc = ext2fs_file_set_size2(file, ext2_off64_t(size))
                ext2fs_file_close(file)
                try check(rc, "truncating inode \(ino) to \(size)")
                inode = try readInode(fs, ino)
                setTimes(&inode, mtime: now, ctime: now)
            }
            if let mode = changes.mode {
                inode.i_mode = UInt16((UInt32(inode.i_mode) & 0o170000) | (mode & 0o7777))
            }
            Self.setOwner(&inode, uid: changes.uid, gid: changes.gid)
            switch changes.atime {
            case .now: setTimes(&inode, atime: now)
            case .set(let t): setTimes(&inode, atime: t)
            case nil: break
            }
            switch changes.mtime {
            case .now: setTimes(&inode, mtime: now)
            case .set(let t): setTimes(&inode, mtime: t)
            case nil: break
            }
            setTimes(&inode, ctime: changes.ctime ?? now)
            try writeInode(fs, ino, &inode)
            return attributes(fs, ino, &inode)
        }
    }

    /// Allocates and initializes an inode with no links yet.
    func newInode(_ fs: ext2_filsys, parent: UInt64, mode: UInt32, owner: Owner) throws(VolumeError) -> (UInt64, ext2_inode_large) {
        var ino: ext2_ino_t = 0
        try check(ext2fs_new_inode(fs, ext2_ino_t(parent), Int32(mode), nil, &ino), "allocating an inode in directory \(parent)")
        ext2fs_inode_alloc_stats2(fs, ino, 1, mode & 0o170000 == 0o040000 ? 1 : 0)
        var inode = ext2_inode_large()
        inode.i_mode = UInt16(truncatingIfNeeded: mode)
        inode.i_extra_isize = Self.extraSize
        let group = Self.newGroup(try readInode(fs, parent), owner)
        Self.setOwner(&inode, uid: owner.uid, gid: group.gid)
        inode.i_generation = nextGeneration
        nextGeneration &+= 1
        let t = Self.now()
        setTimes(&inode, atime: t, mtime: t, ctime: t, crtime: t)
        if ext2fs_has_feature_extents(fs.pointee.super) != 0 && mode & 0o170000 != 0o120000 && !Self.isDevice(mode)
            && mode & 0o170000 != 0o010000 && mode & 0o170000 != 0o140000 {
            // An empty extent tree header in i_block, as the kernel gives every new file and directory.
            var handle: ext2_extent_handle_t?
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_extent_open2(fs, ino, $0, &handle) }
            }
            try check(rc, "initializing the extent tree of inode \(ino)")
            ext2fs_extent_free(handle)
        }
        return (UInt64(ino), inode)
    }

    public func mknod(parent: UInt64, name: String, mode: UInt32, rdev: UInt64, owner: Owner) throws(VolumeError) -> FileAttributes {
        try requireWritable("mknod")
        try Self.checkName(name)
        let type = mode & 0o170000
        guard [0o100000, 0o010000, 0o140000, 0o020000, 0o060000].contains(type) else {
            throw VolumeError(.invalidArgument, "mknod '\(name)': unsupported file type \(String(type, radix: 8))")
        }
        return try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            if try lookupIno(fs, parent, name) != nil { throw VolumeError(.fileExists, "'\(name)' exists in directory \(parent)") }
            var (ino, inode) = try newInode(fs, parent: parent, mode: mode, owner: owner)
            inode.i_links_count = 1
            if Self.isDevice(mode) {
                let major = Self.major(rdev), minor = Self.minor(rdev)
                if major < 256 && minor < 256 {
                    inode.i_block.0 = major << 8 | minor
                } else {
                    inode.i_block.1 = (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)
                }
            }
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_write_new_inode(fs, ext2_ino_t(ino), $0) }
            }
            try check(rc, "writing new inode \(ino)")
            try addLink(fs, parent, name, ino, mode: mode)
            try touchDirectory(fs, parent)
            inode = try readInode(fs, ino)
            return attributes(fs, ino, &inode)
        }
    }

    public func mkdir(parent: UInt64, name: String, mode: UInt32, owner: Owner) throws(VolumeError) -> FileAttributes {
        try requireWritable("mkdir")
        try Self.checkName(name)
        return try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            if try lookupIno(fs, parent, name) != nil { throw VolumeError(.fileExists, "'\(name)' exists in directory \(parent)") }
            // ext2fs_mkdir is given the inode and no name, and addLink adds the entry: given a name,
            // it would scan the parent twice more (its own lookup, then ext2fs_link) and leave the
            // directory cache behind. The inode is allocated as ext2fs_mkdir allocates it.
            var newIno: ext2_ino_t = 0
            try check(ext2fs_new_inode(fs, ext2_ino_t(parent), Int32(0o040755), nil, &newIno), "allocating an inode in directory \(parent)")
            try check(ext2fs_mkdir(fs, ext2_ino_t(parent), newIno, nil), "creating directory '\(name)' in \(parent)")
            let ino = UInt64(newIno)
            do throws(VolumeError) {
                try addLink(fs, parent, name, ino, mode: 0o040000)
            } catch {
                // Undo ext2fs_mkdir: the directory's inode and block, and the parent's count of its "..".
                try? freeInode(fs, ino)
                try? touchDirectory(fs, parent, links: -1)
                throw error
            }
            // ext2fs_mkdir sets a default mode, root ownership and times in seconds: make them the caller's.
            var inode = try readInode(fs, ino)
            // A set-group-ID parent passes on its group and, to subdirectories, the bit itself.
            let group = Self.newGroup(try readInode(fs, parent), owner)
            inode.i_mode = UInt16(0o040000 | (mode & 0o7777) | (group.setgidDirectory ? 0o2000 : 0))
            Self.setOwner(&inode, uid: owner.uid, gid: group.gid)
            // A generation of its own, as the kernel's ext4 gives every new inode (ext2fs_mkdir
            // gives none): the inode number is often a removed directory's, and FUSE tells inodes
            // apart by number and generation. A kernel still holding the removed directory (dead
            // since rmdir) would take this one for it and answer ENOENT inside it.
            inode.i_generation = nextGeneration
            nextGeneration &+= 1
            // With metadata_csum the generation seeds the directory block's checksum: the block
            // ext2fs_mkdir wrote is read under the old one and written back under the new one,
            // as fuse2fs's mkdir does.
            let sealed = try readNewDirectoryBlock(fs, ino, &inode)
            defer { sealed?.buffer.deallocate() }
            let attributes = try finishNewEntry(fs, ino, &inode, parent: parent)
            if let sealed {
                try check(ext2fs_write_dir_block4(fs, sealed.physical, sealed.buffer.baseAddress, 0, ext2_ino_t(ino)),
                          "writing block 0 of new directory \(ino)")
            }
            return attributes
        }
    }

    /// Block 0 of a directory ext2fs_mkdir just made, read and checked under its current
    /// generation, when its checksum depends on the generation (metadata_csum, not inline).
    func readNewDirectoryBlock(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large)
        throws(VolumeError) -> (physical: blk64_t, buffer: UnsafeMutableRawBufferPointer)? {
        guard ext2fs_has_feature_metadata_csum(fs.pointee.super) != 0, inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0 else {
            return nil
        }
        let physical = try directoryBlock(fs, ino, &inode, 0)
        guard physical != 0 else { throw VolumeError(.ioError, "new directory \(ino) has no block 0") }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(fs.pointee.blocksize), alignment: 8)
        do throws(VolumeError) {
            try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(ino)), "reading block 0 of new directory \(ino)")
        } catch {
            buffer.deallocate()
            throw error
        }
        return (physical, buffer)
    }

    /// For entries libext2fs created (ext2fs_mkdir, ext2fs_symlink): room for nanosecond times,
    /// the times themselves, and the parent's mtime and ctime.
    func finishNewEntry(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, parent: UInt64) throws(VolumeError) -> FileAttributes {
        if inode.i_extra_isize < Self.extraSize { inode.i_extra_isize = Self.extraSize }
        let t = Self.now()
        setTimes(&inode, atime: t, mtime: t, ctime: t, crtime: t)
        try writeInode(fs, ino, &inode)
        try touchDirectory(fs, parent)
        return attributes(fs, ino, &inode)
    }

    public func symlink(parent: UInt64, name: String, target: String, owner: Owner) throws(VolumeError) -> FileAttributes {
        try requireWritable("symlink")
        try Self.checkName(name)
        guard !target.isEmpty, target.utf8.count < 4096 else {
            throw VolumeError(target.isEmpty ? .noSuchFileOrDirectory : .fileNameTooLong, "symlink target of '\(name)'")
        }
        return try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            if try lookupIno(fs, parent, name) != nil { throw VolumeError(.fileExists, "'\(name)' exists in directory \(parent)") }
            // As in mkdir: the inode allocated as ext2fs_symlink would, no name given to it, the entry added by addLink.
            var newIno: ext2_ino_t = 0
            try check(ext2fs_new_inode(fs, ext2_ino_t(parent), Int32(0o120755), nil, &newIno), "allocating an inode in directory \(parent)")
            try check(target.withCString { ext2fs_symlink(fs, ext2_ino_t(parent), newIno, nil, $0) }, "creating symlink '\(name)' in \(parent)")
            let ino = UInt64(newIno)
            do throws(VolumeError) {
                try addLink(fs, parent, name, ino, mode: 0o120000)
            } catch {
                try? freeInode(fs, ino)
                throw error
            }
            var inode = try readInode(fs, ino)
            Self.setOwner(&inode, uid: owner.uid, gid: Self.newGroup(try readInode(fs, parent), owner).gid)
            // A generation of its own, as mkdir gives (ext2fs_symlink gives none): FUSE tells a
            // reused inode number apart by it. No block of a symlink is checksummed with it.
            inode.i_generation = nextGeneration
            nextGeneration &+= 1
            return try finishNewEntry(fs, ino, &inode, parent: parent)
        }
    }

    public func link(_ ino: UInt64, newParent: UInt64, newName: String) throws(VolumeError) -> FileAttributes {
        try requireWritable("link")
        try Self.checkName(newName)
        return try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, newParent)
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 != 0o040000 else {
                throw VolumeError(.notPermitted, "hard link to directory inode \(ino)")
            }
            guard inode.i_links_count < 65000 else { throw VolumeError(.tooManyLinks, "inode \(ino) has too many links") }
            if try lookupIno(fs, newParent, newName) != nil { throw VolumeError(.fileExists, "'\(newName)' exists in directory \(newParent)") }
            try addLink(fs, newParent, newName, ino, mode: UInt32(inode.i_mode))
            inode.i_links_count += 1
            setTimes(&inode, ctime: Self.now())
            try writeInode(fs, ino, &inode)
            try touchDirectory(fs, newParent)
            return attributes(fs, ino, &inode)
        }
    }

    public func unlink(parent: UInt64, name: String) throws(VolumeError) {
        try requireWritable("unlink")
        try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            guard let ino = try lookupIno(fs, parent, name) else {
                throw VolumeError(.noSuchFileOrDirectory, "'\(name)' is not in directory \(parent)")
            }
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 != 0o040000 else { throw VolumeError(.isDirectory, "'\(name)' is a directory") }
            try removeLink(fs, parent, name)
            try touchDirectory(fs, parent)
            try dropLink(fs, ino, &inode)
        }
    }

    /// One link fewer; an inode with none left is freed now, or once it is neither open nor held by a kernel.
    func dropLink(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, directory: Bool = false) throws(VolumeError) {
        inode.i_links_count = directory ? 0 : inode.i_links_count - 1
        if directory { directories.drop(ino) }
        setTimes(&inode, ctime: Self.now())
        try writeInode(fs, ino, &inode)
        if inode.i_links_count == 0 {
            if openCounts[ino] != nil || isHeld(ino) { orphans.insert(ino) } else { try freeInode(fs, ino) }
        }
    }

    /// Releases an inode's blocks, extended attributes and the inode itself.
    func freeInode(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) {
        directories.drop(ino)   // its number may come back as a new directory
        var inode = ext2_inode_large()
        let rr = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_read_inode_full(fs, ext2_ino_t(ino), $0, Int32(MemoryLayout<ext2_inode_large>.size))
            }
        }
        try check(rr, "reading inode \(ino)")
        let valid = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_inode_has_valid_blocks2(fs, $0) }
        }
        if valid != 0 {
            try check(punch(fs, ino, &inode, 0, ~0), "releasing the blocks of inode \(ino)")
        }
        try check(ext2fs_free_ext_attr(fs, ext2_ino_t(ino), &inode), "releasing the extended attributes of inode \(ino)")
        inode.i_dtime = UInt32(truncatingIfNeeded: Self.now().seconds)
        try writeInode(fs, ino, &inode)
        ext2fs_inode_alloc_stats2(fs, ext2_ino_t(ino), -1, UInt32(inode.i_mode) & 0o170000 == 0o040000 ? 1 : 0)
        orphans.remove(ino)
    }

    func isEmptyDirectory(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) -> Bool {
        final class Flag { var empty = true }
        let flag = Flag()
        let rc = withExtendedLifetime(flag) {
            ext2fs_dir_iterate2(fs, ext2_ino_t(ino), 0, nil, { _, _, dirent, _, _, _, priv in
                let flag = Unmanaged<Flag>.fromOpaque(priv!).takeUnretainedValue()
                guard let dirent else { return 0 }
                let length = Int(dirent.pointee.name_len & 0xff)
                let dot = withUnsafeBytes(of: &dirent.pointee.name) { raw in
                    (length == 1 && raw[0] == 0x2e) || (length == 2 && raw[0] == 0x2e && raw[1] == 0x2e)
                }
                if !dot && dirent.pointee.inode != 0 {
                    flag.empty = false
                    return DIRENT_ABORT
                }
                return 0
            }, Unmanaged.passUnretained(flag).toOpaque())
        }
        try check(rc, "reading directory \(ino)")
        return flag.empty
    }

    public func rmdir(parent: UInt64, name: String) throws(VolumeError) {
        try requireWritable("rmdir")
        if name == "." { throw VolumeError(.invalidArgument, "rmdir of '.'") }
        if name == ".." { throw VolumeError(.directoryNotEmpty, "rmdir of '..'") }
        try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            guard let ino = try lookupIno(fs, parent, name) else {
                throw VolumeError(.noSuchFileOrDirectory, "'\(name)' is not in directory \(parent)")
            }
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 == 0o040000 else { throw VolumeError(.notDirectory, "'\(name)' is not a directory") }
            guard try isEmptyDirectory(fs, ino) else { throw VolumeError(.directoryNotEmpty, "directory '\(name)' is not empty") }
            try removeLink(fs, parent, name)
            try touchDirectory(fs, parent, links: -1)   // its ".." no longer points at the parent
            try dropLink(fs, ino, &inode, directory: true)
        }
    }

    public func rename(parent: UInt64, name: String, newParent: UInt64, newName: String, flags: RenameFlags) throws(VolumeError) {
        try requireWritable("rename")
        try Self.checkName(newName)
        guard !(flags.contains(.noReplace) && flags.contains(.exchange)) else {
            throw VolumeError(.invalidArgument, "RENAME_NOREPLACE and RENAME_EXCHANGE together")
        }
        try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            _ = try requireDirectory(fs, newParent)
            guard let ino = try lookupIno(fs, parent, name) else {
                throw VolumeError(.noSuchFileOrDirectory, "'\(name)' is not in directory \(parent)")
            }
            let target = try lookupIno(fs, newParent, newName)
            if target == ino { return }   // the same file: POSIX says do nothing
            var inode = try readInode(fs, ino)
            let isDir = UInt32(inode.i_mode) & 0o170000 == 0o040000
            if isDir && parent != newParent {
                // A directory cannot move below itself.
                var walk = newParent
                while walk != rootInode {
                    if walk == ino { throw VolumeError(.invalidArgument, "moving directory '\(name)' into itself") }
                    guard let up = try lookupIno(fs, walk, "..") else { break }
                    walk = up
                }
            }
            if flags.contains(.exchange) {
                guard let other = target else { throw VolumeError(.noSuchFileOrDirectory, "'\(newName)' is not in directory \(newParent)") }
                var otherInode = try readInode(fs, other)
                let otherIsDir = UInt32(otherInode.i_mode) & 0o170000 == 0o040000
                try removeLink(fs, parent, name)
                try removeLink(fs, newParent, newName)
                try addLink(fs, parent, name, other, mode: UInt32(otherInode.i_mode))
                try addLink(fs, newParent, newName, ino, mode: UInt32(inode.i_mode))
                if parent != newParent {
                    if isDir { try setDotDot(fs, ino, to: newParent) }
                    if otherIsDir { try setDotDot(fs, other, to: parent) }
                    let delta = (isDir ? 1 : 0) - (otherIsDir ? 1 : 0)
                    try touchDirectory(fs, parent, links: -delta)
                    try touchDirectory(fs, newParent, links: delta)
                } else {
                    try touchDirectory(fs, parent)
                }
                let t = Self.now()
                setTimes(&inode, ctime: t)
                setTimes(&otherInode, ctime: t)
                try writeInode(fs, ino, &inode)
                try writeInode(fs, other, &otherInode)
                return
            }
            if let other = target {
                if flags.contains(.noReplace) { throw VolumeError(.fileExists, "'\(newName)' exists in directory \(newParent)") }
                var otherInode = try readInode(fs, other)
                let otherIsDir = UInt32(otherInode.i_mode) & 0o170000 == 0o040000
                if isDir && !otherIsDir { throw VolumeError(.notDirectory, "'\(newName)' is not a directory") }
                if !isDir && otherIsDir { throw VolumeError(.isDirectory, "'\(newName)' is a directory") }
                if otherIsDir {
                    guard try isEmptyDirectory(fs, other) else { throw VolumeError(.directoryNotEmpty, "directory '\(newName)' is not empty") }
                }
                try removeLink(fs, newParent, newName)
                if otherIsDir { try touchDirectory(fs, newParent, links: -1) }
                try dropLink(fs, other, &otherInode, directory: otherIsDir)
            }
            try removeLink(fs, parent, name)
            try addLink(fs, newParent, newName, ino, mode: UInt32(inode.i_mode))
            if isDir && parent != newParent {
                try setDotDot(fs, ino, to: newParent)
                try touchDirectory(fs, parent, links: -1)
                try touchDirectory(fs, newParent, links: 1)
            } else {
                try touchDirectory(fs, parent)
                if parent != newParent { try touchDirectory(fs, newParent) }
            }
            inode = try readInode(fs, ino)
            setTimes(&inode, ctime: Self.now())
            try writeInode(fs, ino, &inode)
        }
    }

    /// Points a moved directory's ".." at its new parent.
    func setDotDot(_ fs: ext2_filsys, _ dir: UInt64, to parent: UInt64) throws(VolumeError) {
        try removeLink(fs, dir, "..")
        try addLink(fs, dir, "..", parent, mode: 0o040000)
    }
}
