internal import CExt2fs
import Foundation
import Logging
import ThinFSCore

// Htree indexes for directories the daemon grew, so that kernel ext4 finds a name in them by
// hash rather than by scanning every block.
//
// Kernel ext4 turns a directory into an htree only while it is one block long (make_indexed_dir,
// on the insert that would overflow that block); a directory that is already several plain blocks
// stays plain for good, and every kernel lookup in it reads all its blocks. libext2fs (1.47.0)
// never indexes a plain directory either: ext2fs_link only keeps an existing index current
// (dx_link). So a directory the daemon grows block by block (Volume+Directory.swift) would stay
// O(n) per lookup for the kernel once the layer is kernel-mounted. `indexDirectory` rewrites such a
// directory as an htree, as `e2fsck -D` would, from libext2fs's pieces: ext2fs_dirhash2 (with the
// superblock's default hash version, seed and signedness) for the hashes, ext2fs_write_dir_block4
// for the leaf and dx checksums (metadata_csum), ext2fs_expand_dir/ext2fs_punch for the blocks.
//
// ## On-disk layout (Documentation/filesystems/ext4/directory.rst, "Hash Tree Directories")
//
// A directory of T = 1 + L + N blocks, written here in this order:
//
//     logical 0        dx_root                              ← the first block, "." and ".." first
//     logical 1...L    leaves, each a plain directory block  (entries in hash order, checksum tail)
//     logical L+1...   dx_nodes (only when L > the root's limit: indirect_levels 1)
//
// dx_root (block size B; all fields little-endian):
//
//     offset  size  field
//     ──────  ────  ─────────────────────────────────────────────────────────────
//          0     4  inode of the directory          ┐ "." record: rec_len 12,
//          4     2  rec_len = 12                    │ name_len 1, file type 2
//          6     2  name_len 1, file type           │
//          8     4  ".\0\0\0"                       ┘
//         12     4  inode of the parent             ┐ ".." record: its rec_len covers the
//         16     2  rec_len = B - 12                │ rest of the block, so a reader that
//         18     2  name_len 2, file type           │ knows no htree sees an ordinary
//         20     4  "..\0\0"                        ┘ first block with two entries
//         24     4  reserved_zero = 0               ┐
//         28     1  hash_version (s_def_hash_version)│ dx_root_info
//         29     1  info_length = 8                 │
//         30     1  indirect_levels (0 or 1)        │
//         31     1  unused_flags = 0                ┘
//         32     2  limit = (B - 32 - tail) / 8     ┐ count/limit: overlays entry 0's hash,
//         34     2  count                           │ which is implicitly 0
//         36     4  block of child 0                ┘
//         40  8×(count-1)  dx_entry { hash, block } for children 1...: hash is the least hash in
//                                              the child; bit 0 set means "this child continues
//                                              the previous one's last hash" (a collision run
//                                              split across two leaves)
//     32+8×limit  8  dx_tail { reserved, crc32c } with metadata_csum (tail = 8), else absent
//
// dx_node (only with indirect_levels 1):
//
//          0     4  inode = 0                       ┐ a free record covering the block, so a
//          4     2  rec_len = B                     │ plain reader sees an empty block
//          6     2  name_len 0, file type 0         ┘
//          8     2  limit = (B - 8 - tail) / 8, then count, child 0's block, dx_entries, dx_tail
//
// A leaf is a plain directory block: records (inode, rec_len, name_len, file type, name padded
// to 4 bytes), the last one stretched to the block's end or to its 12-byte checksum tail.
//
// ## What stays correct in the daemon
// The directory cache's room tracking (DirectoryCache invariant 6) only covers plain directories:
// indexing drops the directory's layout (its names stay: the same entries, in other blocks), and
// later creates and unlinks in it go through ext2fs_link's dx_link and ext2fs_unlink, which
// keep the index. Listings still run by position (Volume+Read.swift): the records of an
// indexed directory are read block by block as in a plain one.
//
// ## When
// Where a directory stops changing: at the end of a layer's content write (LayerStore+Content:
// import, apply-diff, the containerd and Docker appliers call `indexGrownDirectories`), and when
// a read-write volume closes (`close` → `indexBeforeClose`): a FUSE mount's unmount (`thinfs
// mount`, thinfs-mount, `thinfs serve`'s containerd and Docker mounts), after its server's last
// commit. Not while a mount is live: readdir cookies are positions (Volume+Read.swift), stable
// in a plain directory only, and the kernel may hold some. A containerd Commit of a snapshot
// still mounted hands the mount's grown directories to the committed copy
// (`takeGrownDirectories`, LayerStore.commitInUse), which indexes them as it closes.
//
// ## Crashes and failures at close
//
//     step                                         a SIGKILL or failure here leaves
//     ───────────────────────────────────────────  ──────────────────────────────────────────────
//     1 fsync: libext2fs's state written, commit   the last commit (atomic commit); all written
//                                                  before the unmount is in it once this returns
//     2 each directory rewritten, under the        SIGKILL: step 1's commit, the directories
//       volume's lock, held from the first         plain (under atomic commit no block step 1
//       directory to the last, so no commit        committed is overwritten in place, and no
//       (periodic, fsync, another group member's:  commit can run: VolumeGroup.commit takes every
//       VolumeGroup.commit) runs meanwhile         member's lock). A failure before a directory's
//                                                  first block is rewritten (ENOSPC growing it)
//                                                  leaves it plain, logged, and the close goes on;
//                                                  one after is thrown (`halfIndexed`), and the
//                                                  caller's rule for a failed close applies
//                                                  (VolumeGroup.leave: back to step 1's commit
//                                                  under atomic commit when no other writer is
//                                                  open)
//     3 close writes the rest; the caller commits  the indexed directories, committed
//
// A layer with no grown directory skips all three: its close costs what it did. On a pool too
// full for the rewrite (`indexSpaceFactor`) step 2 is skipped and the directories stay plain.
extension Volume {
    /// Indexes every directory this volume grew past one block that has no index yet (the end of
    /// a layer import or apply: where a directory stops changing). Returns how many it indexed.
    /// Directories of one block are left alone: the kernel indexes those itself as they grow.
    /// A failure is thrown, the volume forgets its grown directories, and the caller discards the
    /// device (a layer writer's scratch or new layer).
    @discardableResult
    public func indexGrownDirectories() throws(VolumeError) -> Int {
        try withFS { fs throws(VolumeError) in try indexGrown(fs, tolerant: false) }
    }

    /// `close`'s step (see "Crashes and failures at close" above): commits what was written,
    /// then indexes the grown directories. Returns how many it indexed.
    @discardableResult
    func indexBeforeClose() throws(VolumeError) -> Int {
        guard (try? withFS({ _ throws(VolumeError) in !grownDirectories.isEmpty })) == true else { return 0 }
        let started = ContinuousClock.now
        do { try fsync(nil) } catch {
            logger.warning("grown directories left plain: the commit before indexing them failed", metadata: ["error": "\(error)"])
            return 0
        }
        return try withFS { fs throws(VolumeError) in
            let count = grownDirectories.count
            if let free = try? device.freeSpace()?.free {
                let bytes = grownDirectories.reduce(UInt64(0)) { sum, dir in sum + ((try? readInode(fs, dir)).map { fileSize($0) } ?? 0) }
                let need = bytes * Self.indexSpaceFactor + Self.indexSpaceMargin
                guard free >= need else {
                    grownDirectories.removeAll()
                    logger.info("grown directories left plain: the pool is nearly full", metadata: [
                        "directories.grown": "\(count)", "pool.free": "\(free)", "index.needs": "\(need)"])
                    return 0
                }
            }
            let indexed = try indexGrown(fs, tolerant: true)
            logger.info("indexed grown directories at close", metadata: [
                "directories.grown": "\(count)", "directories.indexed": "\(indexed)", "duration": "\(ContinuousClock.now - started)"])
            return indexed
        }
    }

    /// The pool space an index at close asks for, per byte of the directories it rewrites, and
    /// beyond: under atomic commit each rewritten directory block the last commit holds is copied
    /// to a new pool block (64 KiB at the default dm.blocksize, 16 of ext4's 4 KiB blocks, in the
    /// worst case of one directory block per pool block). A rewrite the pool cannot hold would
    /// fail half-way, and with other writers open a group commit would publish that half (the
    /// failed close's rule, VolumeGroup.leave); so on a pool this full the directories stay plain.
    static let indexSpaceFactor: UInt64 = 16
    static let indexSpaceMargin: UInt64 = 8 << 20

    /// The directories this volume grew and has not indexed, handed over: the volume forgets
    /// them. For a writer whose device goes (a failed layer write), and for a containerd Commit
    /// of a snapshot still mounted, whose committed copy indexes them (`addGrownDirectories`).
    public func takeGrownDirectories() -> Set<UInt64> {
        lock.withLock {
            defer { grownDirectories.removeAll() }
            return grownDirectories
        }
    }

    /// Directories to index when this volume closes, as if it had grown them: inode numbers of
    /// a volume this one's device is a snapshot of. Numbers that are no directory here, or a
    /// directory of one block, are skipped then.
    public func addGrownDirectories(_ dirs: Set<UInt64>) {
        lock.withLock { grownDirectories.formUnion(dirs) }
    }

    /// Indexes the grown directories, then forgets them (whatever happens). `tolerant`: a
    /// directory whose index fails before any of its blocks is rewritten is logged and left
    /// plain; otherwise, and for a failure after, the error is thrown.
    private func indexGrown(_ fs: ext2_filsys, tolerant: Bool) throws(VolumeError) -> Int {
        defer {
            grownDirectories.removeAll()
            halfIndexed = nil
        }
        var indexed = 0
        for dir in grownDirectories.sorted() {
            // A grown directory may since have been removed (its number maybe reused by a file).
            guard let inode = try? readInode(fs, dir), UInt32(inode.i_mode) & 0o170000 == 0o040000 else { continue }
            do throws(VolumeError) {
                if try buildIndex(fs, dir) { indexed += 1 }
            } catch {
                if let half = halfIndexed {
                    throw VolumeError(error.errno, "indexing directory \(half) failed with its blocks half rewritten: \(error.context)")
                }
                guard tolerant else { throw error }
                logger.warning("a grown directory is left plain: indexing it failed", metadata: ["inode": "\(dir)", "error": "\(error)"])
            }
        }
        return indexed
    }

    /// Gives directory `dir` an htree index if it is a plain directory of two blocks or more.
    /// Returns false, having changed nothing, when it is not (or its shape is one this builder
    /// does not handle: holes, a tree deeper than two levels).
    @discardableResult
    public func indexDirectory(_ dir: UInt64) throws(VolumeError) -> Bool {
        try withFS { fs throws(VolumeError) in try buildIndex(fs, dir) }
    }

    /// Whether `dir` has an htree index (EXT2_INDEX_FL).
    public func isIndexed(_ dir: UInt64) throws(VolumeError) -> Bool {
        try withFS { fs throws(VolumeError) in try readInode(fs, dir).i_flags & UInt32(EXT2_INDEX_FL) != 0 }
    }

    /// One entry to place: its name bytes, inode, file type and hashes.
    private struct IndexEntry {
        var name: [UInt8]
        var ino: UInt32
        var fileType: UInt8
        var hash: UInt32
        var minor: UInt32
    }

    func buildIndex(_ fs: ext2_filsys, _ dir: UInt64) throws(VolumeError) -> Bool {
        var inode = try requireDirectory(fs, dir)
        let sb = fs.pointee.super!
        let blockSize = Int(fs.pointee.blocksize)
        let blockCount = Int((fileSize(inode) + UInt64(blockSize) - 1) / UInt64(blockSize))
        let hashVersion = Int32(sb.pointee.s_def_hash_version)
        guard Self.isPlainDirectory(inode), ext2fs_has_feature_dir_index(sb) != 0, blockCount >= 2,
              [EXT2_HASH_LEGACY, EXT2_HASH_HALF_MD4, EXT2_HASH_TEA].contains(hashVersion) else { return false }
        // The hash the kernel computes for this directory (ext4_dx_find_entry/dx_probe): the
        // root's version, made "unsigned" by the superblock flag.
        let hashAlgorithm = hashVersion + (sb.pointee.s_flags & UInt32(EXT2_FLAGS_UNSIGNED_HASH) != 0 ? 3 : 0)
        let csum = ext2fs_has_feature_metadata_csum(sb) != 0
        let hasFileType = ext2fs_has_feature_filetype(sb) != 0

        // 1. Every live entry, from the blocks as they are.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 8)
        defer { buffer.deallocate() }
        var entries: [IndexEntry] = []
        var parent: UInt32?
        for logical in 0..<blockCount {
            let physical = try directoryBlock(fs, dir, &inode, UInt64(logical))
            guard physical != 0 else { return false }   // a hole: left as it is (the daemon never makes one)
            try check(ext2fs_read_dir_block4(fs, physical, buffer.baseAddress, 0, ext2_ino_t(dir)),
                      "reading block \(logical) of directory \(dir)")
            let records = try directoryRecords(fs, dir, buffer, logical: UInt64(logical)).records
            for (i, r) in records.enumerated() where r.ino != 0 {
                let name = Array(UnsafeRawBufferPointer(rebasing: buffer[(r.offset + Self.direntNameOffset)...].prefix(r.nameLength)))
                if logical == 0 && i < 2 {
                    // "." and ".." open the first block; the root rewrites them.
                    if i == 1 && name == [0x2e, 0x2e] { parent = r.ino }
                    if name == [0x2e] || name == [0x2e, 0x2e] { continue }
                }
                let dirent = (buffer.baseAddress! + r.offset).assumingMemoryBound(to: ext2_dir_entry.self)
                var hash: ext2_dirhash_t = 0, minor: ext2_dirhash_t = 0
                let rc = withUnsafePointer(to: &sb.pointee.s_hash_seed) { seed in
                    seed.withMemoryRebound(to: UInt32.self, capacity: 4) { seed in
                        name.withUnsafeBufferPointer { n in
                            n.withMemoryRebound(to: CChar.self) {
                                ext2fs_dirhash2(hashAlgorithm, $0.baseAddress, Int32(name.count), fs.pointee.encoding, 0, seed, &hash, &minor)
                            }
                        }
                    }
                }
                try check(rc, "hashing an entry of directory \(dir)")
                entries.append(IndexEntry(name: name, ino: r.ino, fileType: UInt8(truncatingIfNeeded: ext2fs_dirent_file_type(dirent)),
                                          hash: hash, minor: minor))
            }
        }
        guard let parent else {
            throw VolumeError(Self.errno(errcode_t(EXT2_ET_DIR_CORRUPTED)), "directory \(dir) does not start with '.' and '..'")
        }

        // 2. Leaves: entries in hash order, packed first fit; a leaf that starts inside a run of
        //    equal hashes is marked as continuing the one before (bit 0 of its dx_entry hash).
        entries.sort { a, b in
            a.hash != b.hash ? a.hash < b.hash : a.minor != b.minor ? a.minor < b.minor : a.name.lexicographicallyPrecedes(b.name)
        }
        let leafSpace = blockSize - (csum ? 12 : 0)
        var leaves: [Range<Int>] = []
        var leafHashes: [UInt32] = []
        var start = 0, used = 0
        for (i, e) in entries.enumerated() {
            let length = DirectoryCache.recordLength(nameLength: e.name.count)
            if i == 0 || used + length > leafSpace {
                if i > 0 { leaves.append(start..<i) }
                start = i
                used = 0
                leafHashes.append(i > 0 && entries[i - 1].hash == e.hash ? e.hash | 1 : e.hash)
            }
            used += length
        }
        if !entries.isEmpty { leaves.append(start..<entries.count) } else { leaves.append(0..<0); leafHashes.append(0) }

        // 3. The tree above them: the root alone, or the root over dx_nodes (indirect_levels 1).
        let tail = csum ? 8 : 0
        let rootLimit = (blockSize - 32 - tail) / 8, nodeLimit = (blockSize - 8 - tail) / 8
        let nodeCount = leaves.count <= rootLimit ? 0 : (leaves.count + nodeLimit - 1) / nodeLimit
        guard nodeCount <= rootLimit else {
            logger.info("directory \(dir) has too many entries (\(entries.count)) for a two-level htree; left plain")
            return false
        }
        let total = 1 + leaves.count + nodeCount

        // 4. Exactly `total` blocks: grown at the end, or the surplus freed.
        if total > blockCount {
            for _ in blockCount..<total { try check(ext2fs_expand_dir(fs, ext2_ino_t(dir)), "growing directory \(dir)") }
            inode = try readInode(fs, dir)
        } else if total < blockCount {
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                    ext2fs_punch(fs, ext2_ino_t(dir), $0, nil, blk64_t(total), blk64_t(blockCount - 1))
                }
            }
            try check(rc, "freeing blocks \(total)... of directory \(dir)")
            inode = try readInode(fs, dir)
            let rs = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_inode_size_set(fs, $0, ext2_off64_t(total * blockSize)) }
            }
            try check(rs, "setting the size of directory \(dir)")
            try writeInode(fs, dir, &inode)
        }
        guard fileSize(inode) == UInt64(total * blockSize) else {
            throw VolumeError(Self.errno(errcode_t(EXT2_ET_DIR_CORRUPTED)),
                              "directory \(dir) is \(fileSize(inode)) bytes after resizing it to \(total) blocks")
        }
        var physical: [UInt64] = []
        for logical in 0..<total {
            let p = try directoryBlock(fs, dir, &inode, UInt64(logical))
            guard p != 0 else {
                throw VolumeError(Self.errno(errcode_t(EXT2_ET_DIR_CORRUPTED)), "directory \(dir) has a hole at block \(logical) after resizing")
            }
            physical.append(p)
        }
        // From here the directory's blocks are rewritten; a failure leaves it inconsistent, so
        // the directory cache forgets it, and the caller (a layer write) discards the whole device
        // or (a close) fails the close (`halfIndexed`).
        directories.drop(dir)
        halfIndexed = dir

        // 5. The leaves (logical 1...L).
        let base = buffer.baseAddress!
        func record(at offset: Int, ino: UInt32, length: Int, name: [UInt8], fileType: UInt8) throws(VolumeError) {
            let d = (base + offset).assumingMemoryBound(to: ext2_dir_entry.self)
            d.pointee.inode = ino
            try check(ext2fs_set_rec_len(fs, UInt32(length), d), "writing directory \(dir)")
            ext2fs_dirent_set_name_len(d, Int32(name.count))
            ext2fs_dirent_set_file_type(d, hasFileType ? Int32(fileType) : 0)
            name.withUnsafeBytes { (base + offset + Self.direntNameOffset).copyMemory(from: $0.baseAddress!, byteCount: name.count) }
        }
        for (l, leaf) in leaves.enumerated() {
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            var offset = 0
            if leaf.isEmpty {
                try record(at: 0, ino: 0, length: leafSpace, name: [], fileType: 0)
            }
            for i in leaf {
                let e = entries[i]
                let length = i == leaf.upperBound - 1 ? leafSpace - offset : DirectoryCache.recordLength(nameLength: e.name.count)
                try record(at: offset, ino: e.ino, length: length, name: e.name, fileType: e.fileType)
                offset += length
            }
            if csum {
                ext2fs_initialize_dirent_tail(fs, (base + blockSize - 12).assumingMemoryBound(to: ext2_dir_entry_tail.self))
            }
            try check(ext2fs_write_dir_block4(fs, physical[1 + l], base, 0, ext2_ino_t(dir)), "writing leaf \(1 + l) of directory \(dir)")
        }

        // 6. dx_nodes (logical L+1...) and the root (logical 0): count/limit at `at`, then entries.
        func dxEntries(at: Int, limit: Int, children: [(hash: UInt32, block: Int)]) {
            buffer.storeBytes(of: UInt16(limit).littleEndian, toByteOffset: at, as: UInt16.self)
            buffer.storeBytes(of: UInt16(children.count).littleEndian, toByteOffset: at + 2, as: UInt16.self)
            for (i, c) in children.enumerated() {
                if i > 0 { buffer.storeBytes(of: c.hash.littleEndian, toByteOffset: at + 8 * i, as: UInt32.self) }
                buffer.storeBytes(of: UInt32(c.block).littleEndian, toByteOffset: at + 8 * i + 4, as: UInt32.self)
            }
        }
        let leafChildren = leaves.indices.map { (hash: leafHashes[$0], block: 1 + $0) }
        var rootChildren = leafChildren
        if nodeCount > 0 {
            rootChildren = []
            for n in 0..<nodeCount {
                let children = Array(leafChildren[(n * nodeLimit)..<min(leafChildren.count, (n + 1) * nodeLimit)])
                buffer.initializeMemory(as: UInt8.self, repeating: 0)
                try record(at: 0, ino: 0, length: blockSize, name: [], fileType: 0)
                dxEntries(at: 8, limit: nodeLimit, children: children)
                let block = 1 + leaves.count + n
                try check(ext2fs_write_dir_block4(fs, physical[block], base, 0, ext2_ino_t(dir)), "writing index block \(block) of directory \(dir)")
                rootChildren.append((hash: children[0].hash, block: block))
            }
        }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        try record(at: 0, ino: UInt32(dir), length: 12, name: [0x2e], fileType: UInt8(EXT2_FT_DIR))
        try record(at: 12, ino: parent, length: blockSize - 12, name: [0x2e, 0x2e], fileType: UInt8(EXT2_FT_DIR))
        buffer.storeBytes(of: UInt8(truncatingIfNeeded: hashVersion), toByteOffset: 28, as: UInt8.self)
        buffer.storeBytes(of: UInt8(8), toByteOffset: 29, as: UInt8.self)   // info_length
        buffer.storeBytes(of: UInt8(nodeCount > 0 ? 1 : 0), toByteOffset: 30, as: UInt8.self)
        dxEntries(at: 32, limit: rootLimit, children: rootChildren)
        if Self.crashesAt("index.root") {
            // The worst moment: leaves and index nodes on the device, the root and flag not.
            try? channelState(fs.pointee.io).writeBackDirty()
            kill(getpid(), SIGKILL)
        }
        try check(ext2fs_write_dir_block4(fs, physical[0], base, 0, ext2_ino_t(dir)), "writing the index root of directory \(dir)")

        // 7. The flag last: until it is set, the blocks read as a plain directory.
        inode = try readInode(fs, dir)
        inode.i_flags |= UInt32(EXT2_INDEX_FL)
        try writeInode(fs, dir, &inode)
        halfIndexed = nil
        logger.debug("indexed directory \(dir): \(entries.count) entries in \(leaves.count) leaves, \(nodeCount) index nodes")
        return true
    }

    /// Crash injection for the tests, as `LayerStore.crashPoint`: `THINFS_CRASH_AT=index.root`
    /// kills the process with SIGKILL while a directory is indexed, once its leaves and index
    /// nodes are written out of the block cache to the device, before its root and flag.
    static func crashesAt(_ point: String) -> Bool {
        guard let target = getenv("THINFS_CRASH_AT") else { return false }
        return String(cString: target) == point
    }
}
