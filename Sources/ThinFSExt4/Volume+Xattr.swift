internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

// Extended attributes and POSIX ACLs.

extension Volume {
    // MARK: Extended attributes

    func withXattrs<T>(_ fs: ext2_filsys, _ ino: UInt64, _ body: (OpaquePointer) throws(VolumeError) -> T) throws(VolumeError) -> T {
        var handle: OpaquePointer?
        try check(ext2fs_xattrs_open(fs, ext2_ino_t(ino), &handle), "opening the extended attributes of inode \(ino)")
        defer { ext2fs_xattrs_close(&handle) }
        try check(ext2fs_xattrs_read(handle), "reading the extended attributes of inode \(ino)")
        return try body(handle!)
    }

    /// False when the inode can hold no extended attribute: no EA block, and no in-inode EA header
    /// (the magic `EXT2_EXT_ATTR_MAGIC` right after `i_extra_isize`, as ext4's and libext2fs's
    /// readers look for it). True means: ask libext2fs.
    func mayHoldXattrs(_ fs: ext2_filsys, _ ino: UInt64, _ inode: ext2_inode_large) throws(VolumeError) -> Bool {
        var inode = inode
        let block = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_file_acl_block(fs, $0) }
        }
        if block != 0 { return true }
        let size = Int(fs.pointee.super.pointee.s_inode_size)
        let header = Int(EXT2_GOOD_OLD_INODE_SIZE) + Int(inode.i_extra_isize)
        guard size > Int(EXT2_GOOD_OLD_INODE_SIZE), header + 4 <= size else { return false }
        return try withUnsafeTemporaryAllocation(byteCount: size, alignment: 8) { raw throws(VolumeError) -> Bool in
            let rc = ext2fs_read_inode_full(fs, ext2_ino_t(ino), raw.baseAddress!.assumingMemoryBound(to: ext2_inode.self), Int32(size))
            try check(rc, "reading inode \(ino)")
            return UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: header, as: UInt32.self)) == UInt32(EXT2_EXT_ATTR_MAGIC)
        }
    }

    static func checkXattrName(_ name: String) throws(VolumeError) {
        let known = ["user.", "trusted.", "security.", "system."]
        guard known.contains(where: name.hasPrefix), name.utf8.count <= 255 else {
            throw VolumeError(.notSupported, "extended attribute name '\(name)' has no supported namespace")
        }
    }

    // MARK: Attribute-free inodes
    //
    // The kernel asks for `security.capability` before every write(2) (file_remove_privs; FUSE
    // never caches the answer), and most inodes hold no attribute at all. `xattrFree` lets such a
    // getxattr be answered without the volume's lock, which a stream of WRITEs holds most of the
    // time (docs/benchmarks.md, "Issue 11's goals, session 12": the writer's GETXATTR queued
    // behind them). A wrong "no attribute" would be a security bug: the kernel would not remove
    // a file capability on write. So:
    // 1. **Added only under `lock`,** by a getxattr that has just read the inode and found no EA
    //    block and no in-inode EA header (`mayHoldXattrs`), in the same critical section.
    // 2. **Removed under `lock` before anything gives the inode an attribute.** Only `setxattr`
    //    adds attributes (the FUSE server's, and the layer applier's, which calls the same
    //    function). Removing one (`removexattr`, the free of a deleted inode) cannot make an entry
    //    false. A new inode is written whole by `ext2fs_write_new_inode` (or `ext2fs_mkdir`,
    //    `ext2fs_symlink`), which zero its in-inode EA area and set no EA block, so an entry left
    //    from the inode number's previous life stays true. With the `inline_data` feature,
    //    libext2fs itself keeps file data in a `system.data` attribute: on such a filesystem
    //    nothing is ever added (Docker's mke2fs options, and `thinfs dev format`'s, leave it off).
    // 3. **Emptied when the handle is reopened** (`reopen`), since `body` changed the disk.
    // By 1 and 2, an entry is true whenever `lock` is free. A reader that finds one without
    // `lock` is ordered before any setxattr that has not yet taken `lock` (`xattrFreeLock`
    // orders the set's accesses), which is a linearization of two concurrent calls.

    func isXattrFree(_ ino: UInt64) -> Bool { xattrFreeLock.withLock { xattrFree.contains(ino) } }

    public func getxattr(_ ino: UInt64, name: String) throws(VolumeError) -> [UInt8] {
        try Self.checkXattrName(name)
        if isXattrFree(ino) { throw VolumeError(.init(rawValue: ENODATA), "inode \(ino) has no attribute '\(name)'") }
        return try withFS { fs throws(VolumeError) in
            let inode = try readInode(fs, ino)
            // Answer an inode with no attribute from the inode itself, without libext2fs's
            // attribute handle (a copy of the inode, a parse, allocations), and remember it (1).
            guard try mayHoldXattrs(fs, ino, inode) else {
                if ext2fs_has_feature_inline_data(fs.pointee.super) == 0 { xattrFreeLock.withLock { _ = xattrFree.insert(ino) } }
                throw VolumeError(.init(rawValue: ENODATA), "inode \(ino) has no attribute '\(name)'")
            }
            return try withXattrs(fs, ino) { h throws(VolumeError) in
                var value: UnsafeMutableRawPointer?
                var length = 0
                let rc = ext2fs_xattr_get(h, name, &value, &length)
                if rc == EXT2_ET_EA_KEY_NOT_FOUND { throw VolumeError(.init(rawValue: ENODATA), "inode \(ino) has no attribute '\(name)'") }
                try check(rc, "reading attribute '\(name)' of inode \(ino)")
                defer { ext2fs_free_mem_shim(value) }
                return Array(UnsafeRawBufferPointer(start: value, count: length))
            }
        }
    }

    /// An access ACL in the xattr format (posix_acl_xattr.h): a u32 version 2, then
    /// (u16 tag, u16 perm, u32 id) entries. Returns the permission bits it implies
    /// and whether it says no more than those bits (only owner, group and other).
    static func accessACLMode(_ value: [UInt8]) throws(VolumeError) -> (mode: UInt32, equivalent: Bool) {
        func u16(_ i: Int) -> UInt32 { UInt32(value[i]) | UInt32(value[i + 1]) << 8 }
        guard value.count >= 4, (value.count - 4) % 8 == 0, u16(0) == 2, u16(2) == 0 else {
            throw VolumeError(.invalidArgument, "system.posix_acl_access is not a version 2 ACL")
        }
        var owner: UInt32?, group: UInt32?, other: UInt32?, mask: UInt32?
        var named = false
        for i in stride(from: 4, to: value.count, by: 8) {
            let perm = u16(i + 2) & 7
            switch u16(i) {
            case 0x01: owner = perm
            case 0x02, 0x08: named = true
            case 0x04: group = perm
            case 0x10: mask = perm
            case 0x20: other = perm
            default: throw VolumeError(.invalidArgument, "system.posix_acl_access has an unknown tag \(u16(i))")
            }
        }
        guard let owner, let group, let other, !named || mask != nil else {
            throw VolumeError(.invalidArgument, "system.posix_acl_access lacks a required entry")
        }
        return (owner << 6 | (mask ?? group) << 3 | other, !named && mask == nil)
    }

    public func setxattr(_ ino: UInt64, name: String, value: [UInt8], flags: XattrFlags) throws(VolumeError) {
        try requireWritable("setxattr")
        try Self.checkXattrName(name)
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            // Before the inode can hold an attribute (2).
            xattrFreeLock.withLock { _ = xattrFree.remove(ino) }
            if name == "system.posix_acl_access" {
                // As the kernel's posix_acl_update_mode: the ACL's owner, group (or mask) and other
                // permissions become the mode bits, and an ACL that says nothing more is not stored.
                let acl = try Self.accessACLMode(value)
                inode.i_mode = UInt16((UInt32(inode.i_mode) & ~0o777) | acl.mode)
                setTimes(&inode, ctime: Self.now())
                try writeInode(fs, ino, &inode)
                if acl.equivalent {
                    try withXattrs(fs, ino) { h throws(VolumeError) in
                        let rc = ext2fs_xattr_remove(h, name)
                        if rc != EXT2_ET_EA_KEY_NOT_FOUND { try check(rc, "removing attribute '\(name)' of inode \(ino)") }
                    }
                    return
                }
            }
            try withXattrs(fs, ino) { h throws(VolumeError) in
                var existing: UnsafeMutableRawPointer?
                var length = 0
                let lookup = ext2fs_xattr_get(h, name, &existing, &length)
                if lookup == 0 { ext2fs_free_mem_shim(existing) }
                if flags.contains(.create) && lookup == 0 { throw VolumeError(.fileExists, "attribute '\(name)' exists on inode \(ino)") }
                if flags.contains(.replace) && lookup != 0 { throw VolumeError(.init(rawValue: ENODATA), "inode \(ino) has no attribute '\(name)'") }
                let rc = value.withUnsafeBytes { b in
                    // An empty value still needs a non-null pointer.
                    ext2fs_xattr_set(h, name, b.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, b.count)
                }
                try check(rc, "setting attribute '\(name)' of inode \(ino)")
            }
            inode = try readInode(fs, ino)
            setTimes(&inode, ctime: Self.now())
            try writeInode(fs, ino, &inode)
        }
    }

    public func listxattr(_ ino: UInt64) throws(VolumeError) -> [String] {
        try withFS { fs throws(VolumeError) in
            _ = try readInode(fs, ino)
            return try withXattrs(fs, ino) { h throws(VolumeError) in
                final class Names { var list: [String] = [] }
                let names = Names()
                let rc = withExtendedLifetime(names) {
                    ext2fs_xattrs_iterate(h, { name, _, _, priv in
                        let names = Unmanaged<Names>.fromOpaque(priv!).takeUnretainedValue()
                        if let name { names.list.append(String(cString: name)) }
                        return 0
                    }, Unmanaged.passUnretained(names).toOpaque())
                }
                try check(rc, "listing attributes of inode \(ino)")
                return names.list
            }
        }
    }

    public func removexattr(_ ino: UInt64, name: String) throws(VolumeError) {
        try requireWritable("removexattr")
        try Self.checkXattrName(name)
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            try withXattrs(fs, ino) { h throws(VolumeError) in
                var existing: UnsafeMutableRawPointer?
                var length = 0
                let lookup = ext2fs_xattr_get(h, name, &existing, &length)
                if lookup == EXT2_ET_EA_KEY_NOT_FOUND { throw VolumeError(.init(rawValue: ENODATA), "inode \(ino) has no attribute '\(name)'") }
                try check(lookup, "reading attribute '\(name)' of inode \(ino)")
                ext2fs_free_mem_shim(existing)
                try check(ext2fs_xattr_remove(h, name), "removing attribute '\(name)' of inode \(ino)")
            }
            inode = try readInode(fs, ino)
            setTimes(&inode, ctime: Self.now())
            try writeInode(fs, ino, &inode)
        }
    }
}
