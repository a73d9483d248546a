internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

// Names and directory blocks: lookups through the directory cache, and the entries that every
// create, link, unlink and rename adds or removes.

extension Volume {
    // MARK: Names

    static func checkName(_ name: String) throws(VolumeError) {
        guard !name.isEmpty, name != ".", name != "..", !name.contains("/"), !name.utf8.contains(0) else {
            throw VolumeError(.invalidArgument, "'\(name)' is not a valid file name")
        }
        guard name.utf8.count <= 255 else { throw VolumeError(.fileNameTooLong, "'\(name.prefix(32))...' is longer than 255 bytes") }
    }

    /// The inode `name` links to in `parent`, from the directory cache; a directory not yet
    /// cached is scanned once and cached whole, so the next lookups in it are hash probes.
    func lookupIno(_ fs: ext2_filsys, _ parent: UInt64, _ name: String) throws(VolumeError) -> UInt64? {
        let bytes = Array(name.utf8)
        switch directories.lookup(parent, bytes) {
        case .found(let entry)?: return UInt64(entry.ino)
        case .absent?: return nil
        case nil: break
        }
        if !DirectoryCache.isDot(bytes) {
            let (listing, layout) = try scanDirectory(fs, parent)
            if directories.store(parent, listing, layout: layout) {
                return directories.lookup(parent, bytes).flatMap { if case .found(let e) = $0 { UInt64(e.ino) } else { nil } }
            }
        }
        // "." and "..", found at once at the start of the first block, and directories too big to cache.
        var ino: ext2_ino_t = 0
        let rc = name.withCString { ext2fs_lookup(fs, ext2_ino_t(parent), $0, Int32(name.utf8.count), nil, &ino) }
        if rc == EXT2_ET_FILE_NOT_FOUND { return nil }
        try check(rc, "looking up '\(name)' in directory \(parent)")
        return UInt64(ino)
    }

    /// Every live entry of `dir`, in one pass over its blocks: what the directory cache is built
    /// from; and, for a plain directory, where each entry is and where there is room (the layout).
    func scanDirectory(_ fs: ext2_filsys, _ dir: UInt64) throws(VolumeError)
        -> (entries: [(name: [UInt8], entry: DirectoryCache.Entry)], layout: DirectoryCache.Layout?) {
        var inode = try requireDirectory(fs, dir)
        if Self.isPlainDirectory(inode) {
            let (entries, layout) = try scanPlainDirectory(fs, dir, &inode)
            return (entries, layout)
        }
        final class Listing { var entries: [(name: [UInt8], entry: DirectoryCache.Entry)] = [] }
        let listing = Listing()
        let rc = withExtendedLifetime(listing) {
            ext2fs_dir_iterate2(fs, ext2_ino_t(dir), 0, nil, { _, _, dirent, _, _, _, priv in
                guard let dirent else { return 0 }
                let listing = Unmanaged<Listing>.fromOpaque(priv!).takeUnretainedValue()
                let length = Int(dirent.pointee.name_len & 0xff)
                let name = withUnsafeBytes(of: &dirent.pointee.name) { Array($0.prefix(length)) }
                listing.entries.append((name, .init(ino: dirent.pointee.inode, fileType: UInt8(truncatingIfNeeded: ext2fs_dirent_file_type(dirent)))))
                return 0
            }, Unmanaged.passUnretained(listing).toOpaque())
        }
        try check(rc, "reading directory \(dir)")
        return (listing.entries, nil)
    }

    // MARK: Directory blocks
    //
    // A directory without an htree index is a list of blocks, each a chain of records (inode,
    // rec_len, name_len, file_type, name) that covers the block up to its checksum tail
    // (metadata_csum). libext2fs's ext2fs_link looks for room by reading every block of such a
    // directory, and ext2fs_unlink for the name the same way, so a create or an unlink in a
    // directory of n entries cost O(n). The directory cache knows which block holds each name
    // and which blocks have room (DirectoryCache invariant 6), so these add and remove an entry
    // in one block: read with ext2fs_read_dir_block4 (which verifies the block's checksum), the
    // record changed with libext2fs's rec_len and name_len accessors, written with
    // ext2fs_write_dir_block4 (which sets the checksum). They change records as ext2fs_link,
    // ext2fs_unlink and kernel ext4 do (an insert takes the first record with room, splitting a
    // live record's slack or filling an empty one; a removal merges the record into the one before
    // it, or empties the block's first record), so live entries never move and readdir's
    // position cookies stay valid.

    /// Whether `inode` is a directory whose entries this file adds and removes itself: mapped by
    /// blocks, no htree index (its leaves are in hash order), no inline data, no casefolding or
    /// encryption (their records carry a hash).
    static func isPlainDirectory(_ inode: ext2_inode_large) -> Bool {
        inode.i_flags & UInt32(EXT2_INDEX_FL | EXT4_INLINE_DATA_FL | EXT4_CASEFOLD_FL | EXT4_ENCRYPT_FL) == 0
    }

    /// One record of a directory block.
    struct DirectoryRecord {
        var offset: Int
        var length: Int
        var ino: UInt32
        var nameLength: Int
        /// The longest record an insert can place here: a live record's slack, a free record's length.
        var room: Int { ino != 0 ? length - DirectoryCache.recordLength(nameLength: nameLength) : length }
    }

    /// The records of a directory block before its checksum tail, each checked as
    /// ext2fs_process_dir_block checks it, and whether the block may take new entries: with
    /// metadata_csum, only if it ends in a tail, which ext2fs_write_dir_block4 needs.
    func directoryRecords(_ fs: ext2_filsys, _ dir: UInt64, _ block: UnsafeMutableRawBufferPointer,
                                  logical: UInt64) throws(VolumeError) -> (records: [DirectoryRecord], writable: Bool) {
        let size = block.count
        var end = size
        var writable = true
        if ext2fs_has_feature_metadata_csum(fs.pointee.super) != 0 {
            // struct ext2_dir_entry_tail: zero inode, rec_len 12, name_len 0 and file type 0xDE.
            let t = size - 12
            let hasTail = block.load(fromByteOffset: t, as: UInt32.self) == 0
                && UInt16(littleEndian: block.load(fromByteOffset: t + 4, as: UInt16.self)) == 12
                && UInt16(littleEndian: block.load(fromByteOffset: t + 6, as: UInt16.self)) == UInt16(EXT2_DIR_NAME_LEN_CSUM)
            if hasTail { end = t } else { writable = false }
        }
        var records: [DirectoryRecord] = []
        var offset = 0
        while offset < end {
            let dirent = (block.baseAddress! + offset).assumingMemoryBound(to: ext2_dir_entry.self)
            var length: UInt32 = 0
            try check(ext2fs_get_rec_len(fs, dirent, &length), "reading directory \(dir)")
            let nameLength = Int(ext2fs_dirent_name_len(dirent))
            guard offset + 8 <= end, length >= 8, length % 4 == 0, offset + Int(length) <= end,
                  Self.direntNameOffset + nameLength <= Int(length) else {
                throw VolumeError(Self.errno(errcode_t(EXT2_ET_DIR_CORRUPTED)),
                                  "directory \(dir) has a bad entry at offset \(offset) of its block \(logical)")
            }
            records.append(DirectoryRecord(offset: offset, length: Int(length), ino: dirent.pointee.inode, nameLength: nameLength))
            offset += Int(length)
        }
        return (records, writable)
    }

    /// The room a block offers an insert (0 when it takes none).
    static func room(_ records: [DirectoryRecord], writable: Bool) -> Int {
        writable ? records.lazy.map(\.room).max() ?? 0 : 0
    }

    /// A plain directory's entries and layout, block by block.
    func scanPlainDirectory(_ fs: ext2_filsys, _ dir: UInt64, _ inode: inout ext2_inode_large) throws(VolumeError)
        -> ([(name: [UInt8], entry: DirectoryCache.Entry)], DirectoryCache.Layout) {
        let blockSize = Int(fs.pointee.blocksize)
        let count = (fileSize(inode) + UInt64(blockSize) - 1) / UInt64(blockSize)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 8)
        defer { buffer.deallocate() }
        var entries: [(name: [UInt8], entry: DirectoryCache.Entry)] = []
        var layout = DirectoryCache.Layout()
        for logical in 0..<count {
            let physical = try directoryBlock(fs, dir, &inode, logical)
            layout.physical.append(physical)
            guard physical != 0 else { layout.room.append(0); continue }   // a hole
            try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(dir)),
                      "reading block \(logical) of directory \(dir)")
            let (records, writable) = try directoryRecords(fs, dir, buffer, logical: logical)
            for r in records where r.ino != 0 {
                let name = Array(UnsafeRawBufferPointer(rebasing: buffer[(r.offset + Self.direntNameOffset)...].prefix(r.nameLength)))
                if DirectoryCache.isDot(name) { continue }
                let dirent = (buffer.baseAddress! + r.offset).assumingMemoryBound(to: ext2_dir_entry.self)
                entries.append((name, .init(ino: r.ino, fileType: UInt8(truncatingIfNeeded: ext2fs_dirent_file_type(dirent)),
                                            block: UInt32(logical))))
            }
            layout.room.append(UInt16(clamping: Self.room(records, writable: writable)))
        }
        return (entries, layout)
    }

    /// The physical block of logical block `logical` of directory `dir` (0 for a hole).
    func directoryBlock(_ fs: ext2_filsys, _ dir: UInt64, _ inode: inout ext2_inode_large, _ logical: UInt64) throws(VolumeError) -> UInt64 {
        var physical: blk64_t = 0
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                ext2fs_bmap2(fs, ext2_ino_t(dir), $0, nil, 0, logical, nil, &physical)
            }
        }
        try check(rc, "mapping block \(logical) of directory \(dir)")
        return physical
    }

    /// Adds `name` to a directory with a layout, in the first block with room, growing the
    /// directory by a block when none has. Returns false, having changed nothing, when the
    /// directory has no layout (the caller then asks libext2fs).
    func insertEntry(_ fs: ext2_filsys, _ dir: UInt64, _ name: [UInt8], _ ino: UInt64, fileType: Int32) throws(VolumeError) -> Bool {
        guard let layout = directories.layout(dir) else { return false }
        let need = DirectoryCache.recordLength(nameLength: name.count)
        let logical: Int
        if let b = layout.firstBlock(fitting: need) {
            logical = b
        } else {
            // ext2fs_expand_dir appends one empty block (its checksum tail included) past the last one.
            try check(ext2fs_expand_dir(fs, ext2_ino_t(dir)), "growing directory \(dir)")
            grownDirectories.insert(dir)
            var inode = try readInode(fs, dir)
            let last = (fileSize(inode) + UInt64(fs.pointee.blocksize) - 1) / UInt64(fs.pointee.blocksize) - 1
            let physical = try directoryBlock(fs, dir, &inode, last)
            guard physical != 0, Int(last) >= layout.physical.count else {
                // Not where the layout expected it (a directory ending in a hole): libext2fs takes over.
                directories.dropLayout(dir)
                return false
            }
            directories.addBlock(dir, block: Int(last), physical: physical, room: Int(fs.pointee.blocksize))
            logical = Int(last)
        }
        let physical = directories.layout(dir)!.physical[logical]
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(fs.pointee.blocksize), alignment: 8)
        defer { buffer.deallocate() }
        try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(dir)),
                  "reading block \(logical) of directory \(dir)")
        var (records, writable) = try directoryRecords(fs, dir, buffer, logical: UInt64(logical))
        guard writable, let r = records.first(where: { $0.room >= need }) else {
            // The layout disagrees with the block (a grown block is empty, so this is the cache's
            // error, not the disk's): forget the layout and let libext2fs search.
            logger.warning("directory \(dir): block \(logical) has no room for \(need) bytes though the cache said so")
            directories.dropLayout(dir)
            return false
        }
        let base = buffer.baseAddress!
        var target = (base + r.offset).assumingMemoryBound(to: ext2_dir_entry.self)
        if r.ino != 0 {
            // Split the live record: it keeps what its name needs, the new entry takes the rest.
            let keep = DirectoryCache.recordLength(nameLength: r.nameLength)
            try check(ext2fs_set_rec_len(fs, UInt32(keep), target), "splitting an entry of directory \(dir)")
            target = (base + r.offset + keep).assumingMemoryBound(to: ext2_dir_entry.self)
            try check(ext2fs_set_rec_len(fs, UInt32(r.length - keep), target), "splitting an entry of directory \(dir)")
        }
        target.pointee.inode = ext2_ino_t(ino)
        ext2fs_dirent_set_name_len(target, Int32(name.count))
        ext2fs_dirent_set_file_type(target, ext2fs_has_feature_filetype(fs.pointee.super) != 0 ? fileType : 0)
        name.withUnsafeBytes { UnsafeMutableRawPointer(target).advanced(by: Self.direntNameOffset).copyMemory(from: $0.baseAddress!, byteCount: name.count) }
        try check(ext2fs_write_dir_block4(fs, physical, base, 0, ext2_ino_t(dir)), "writing block \(logical) of directory \(dir)")
        records = try directoryRecords(fs, dir, buffer, logical: UInt64(logical)).records
        directories.setRoom(dir, block: logical, Self.room(records, writable: true))
        directories.added(dir, name, .init(ino: UInt32(ino), fileType: UInt8(truncatingIfNeeded: fileType), block: UInt32(logical)))
        return true
    }

    /// Removes `name` from a directory with a layout, in the block the cache says holds it.
    /// Returns false, having changed nothing, when the directory has no layout or the block does
    /// not hold the name (the caller then asks libext2fs).
    func deleteEntry(_ fs: ext2_filsys, _ dir: UInt64, _ name: [UInt8]) throws(VolumeError) -> Bool {
        guard let layout = directories.layout(dir), let entry = directories.peek(dir, name),
              Int(entry.block) < layout.physical.count, layout.physical[Int(entry.block)] != 0 else { return false }
        let logical = Int(entry.block), physical = layout.physical[logical]
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(fs.pointee.blocksize), alignment: 8)
        defer { buffer.deallocate() }
        try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(dir)),
                  "reading block \(logical) of directory \(dir)")
        var (records, writable) = try directoryRecords(fs, dir, buffer, logical: UInt64(logical))
        let base = buffer.baseAddress!
        guard let i = records.firstIndex(where: { r in
            r.ino != 0 && r.nameLength == name.count
                && memcmp(base + r.offset + Self.direntNameOffset, name, name.count) == 0
        }) else {
            logger.warning("directory \(dir): block \(logical) does not hold an entry the cache placed there")
            directories.dropLayout(dir)
            return false
        }
        let dirent = (base + records[i].offset).assumingMemoryBound(to: ext2_dir_entry.self)
        if i > 0 {
            let previous = (base + records[i - 1].offset).assumingMemoryBound(to: ext2_dir_entry.self)
            try check(ext2fs_set_rec_len(fs, UInt32(records[i - 1].length + records[i].length), previous),
                      "removing an entry of directory \(dir)")
        } else {
            dirent.pointee.inode = 0
        }
        try check(ext2fs_write_dir_block4(fs, physical, base, 0, ext2_ino_t(dir)), "writing block \(logical) of directory \(dir)")
        (records, writable) = try directoryRecords(fs, dir, buffer, logical: UInt64(logical))
        directories.setRoom(dir, block: logical, Self.room(records, writable: writable))
        directories.removed(dir, name)
        return true
    }

    func requireDirectory(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) -> ext2_inode_large {
        let inode = try readInode(fs, ino)
        guard UInt32(inode.i_mode) & 0o170000 == 0o040000 else {
            throw VolumeError(.notDirectory, "inode \(ino) is not a directory")
        }
        return inode
    }

    /// Adds a directory entry, growing the directory when its blocks are full: in one block when
    /// the directory cache knows where there is room, else through ext2fs_link.
    func addLink(_ fs: ext2_filsys, _ dir: UInt64, _ name: String, _ ino: UInt64, mode: UInt32) throws(VolumeError) {
        let bytes = Array(name.utf8)
        if !DirectoryCache.isDot(bytes) {
            do throws(VolumeError) {
                if try insertEntry(fs, dir, bytes, ino, fileType: Self.fileType(mode)) { return }
            } catch {
                directories.drop(dir)   // the directory may or may not have changed
                throw error
            }
        }
        let rc: errcode_t
        do throws(VolumeError) {
            rc = try withDirectorySpace(fs, dir) {
                name.withCString { ext2fs_link(fs, ext2_ino_t(dir), $0, ext2_ino_t(ino), Self.fileType(mode)) }
            }
        } catch {
            directories.drop(dir)
            throw error
        }
        guard rc == 0 else {
            directories.drop(dir)   // the directory may or may not have changed
            try check(rc, "adding '\(name)' to directory \(dir)")
            return
        }
        // libext2fs chose the block: the entry's place is unknown, and so the layout goes (6).
        directories.dropLayout(dir)
        directories.added(dir, bytes, .init(ino: UInt32(ino), fileType: UInt8(Self.fileType(mode))))
    }

    /// Runs a libext2fs call that adds an entry to `dir`, growing the directory once if it is full.
    func withDirectorySpace(_ fs: ext2_filsys, _ dir: UInt64, _ call: () -> errcode_t) throws(VolumeError) -> errcode_t {
        let rc = call()
        guard rc == EXT2_ET_DIR_NO_SPACE else { return rc }
        // An indexed directory grows through its index (dx_link); a block appended past it would
        // be one the index does not reference, which e2fsck reports. Its tree is full: ENOSPC.
        if try readInode(fs, dir).i_flags & UInt32(EXT2_INDEX_FL) != 0 { return rc }
        try check(ext2fs_expand_dir(fs, ext2_ino_t(dir)), "growing directory \(dir)")
        grownDirectories.insert(dir)
        return call()
    }

    /// Removes a directory entry: in the one block that holds it when the directory cache knows
    /// which, else through ext2fs_unlink.
    func removeLink(_ fs: ext2_filsys, _ dir: UInt64, _ name: String) throws(VolumeError) {
        let bytes = Array(name.utf8)
        if !DirectoryCache.isDot(bytes) {
            do throws(VolumeError) {
                if try deleteEntry(fs, dir, bytes) { return }
            } catch {
                directories.drop(dir)
                throw error
            }
        }
        let rc = name.withCString { ext2fs_unlink(fs, ext2_ino_t(dir), $0, 0, 0) }
        guard rc == 0 else {
            directories.drop(dir)
            try check(rc, "removing '\(name)' from directory \(dir)")
            return
        }
        directories.dropLayout(dir)
        directories.removed(dir, bytes)
    }

    /// Marks a directory's contents changed (mtime and ctime).
    func touchDirectory(_ fs: ext2_filsys, _ dir: UInt64, links delta: Int = 0) throws(VolumeError) {
        var inode = try readInode(fs, dir)
        let t = Self.now()
        setTimes(&inode, mtime: t, ctime: t)
        inode.i_links_count = UInt16(Int(inode.i_links_count) + delta)
        try writeInode(fs, dir, &inode)
    }
}
