internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

// The read path: lookup, getattr, readdir, readlink, read and statfs.

extension Volume {
    // MARK: FileSystemVolume: reading

    public func lookup(parent: UInt64, name: String) throws(VolumeError) -> FileAttributes {
        try withFS { fs throws(VolumeError) in
            _ = try requireDirectory(fs, parent)
            guard name.utf8.count <= 255 else { throw VolumeError(.fileNameTooLong, "name longer than 255 bytes") }
            guard let ino = try lookupIno(fs, parent, name) else {
                throw VolumeError(.noSuchFileOrDirectory, "'\(name)' is not in directory \(parent)")
            }
            var inode = try readInode(fs, ino)
            return attributes(fs, ino, &inode)
        }
    }

    public func getattr(_ ino: UInt64) throws(VolumeError) -> FileAttributes {
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            return attributes(fs, ino, &inode)
        }
    }

    /// Directory cookies are positions, as kernel ext4 gives them for a directory without an htree
    /// index: the entry at byte `offset` of logical block `b` is at `b * blocksize + offset`, and its
    /// cookie is that position + 1, "resume past here" (0, the start, is before "." at position 0).
    /// libext2fs never moves a live entry of such a directory: unlink merges the entry's space into the
    /// entry before it, link splits free space, a full directory grows by a block at its end. So a cookie
    /// outlives changes, and an entry neither added nor removed during a listing is returned exactly once
    /// (POSIX readdir), where an index among live entries shifted with every unlink.
    ///
    /// An htree-indexed directory (only kernel ext4 makes them) is listed the same way, but there a
    /// create can split a leaf block (libext2fs's dx_link) and move entries within the directory, so a
    /// listing that runs while entries are added may return some twice; kernel ext4 uses hash cookies
    /// for such directories instead.
    ///
    /// A call reads the directory from the cookie's block on, one block per turn of the lock: the callback
    /// (FUSE buffer packing) runs without the lock, and a whole listing reads each block once.
    public func readdir(_ ino: UInt64, after cookie: UInt64,
                        _ body: (DirectoryEntry) throws(VolumeError) -> Bool) throws(VolumeError) {
        var position = cookie
        while true {
            let (entries, next) = try withFS { fs throws(VolumeError) in try directoryEntries(fs, ino, from: position) }
            for e in entries where !(try body(e)) { return }
            guard let next else { return }
            position = next
        }
    }

    /// The entries at `position` and after it in the first directory block from there that holds any,
    /// and the position just past that block (nil at the end of the directory).
    func directoryEntries(_ fs: ext2_filsys, _ ino: UInt64,
                                  from position: UInt64) throws(VolumeError) -> ([DirectoryEntry], UInt64?) {
        var inode = try requireDirectory(fs, ino)
        if inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) != 0 {
            return (try inlineDirectoryEntries(fs, ino, from: position), nil)
        }
        let blockSize = UInt64(fs.pointee.blocksize)
        let blocks = (fileSize(inode) + blockSize - 1) / blockSize
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: Int(blockSize), alignment: 8)
        defer { buffer.deallocate() }
        var logical = position / blockSize
        while logical < blocks {
            var physical: blk64_t = 0
            let rc = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                    ext2fs_bmap2(fs, ext2_ino_t(ino), $0, nil, 0, logical, nil, &physical)
                }
            }
            try check(rc, "mapping block \(logical) of directory \(ino)")
            // A hole (kernel ext4 leaves them in directories) holds no entries.
            if physical != 0 {
                // read_dir_block4 verifies the block's checksum, as ext2fs_dir_iterate2 does.
                try check(ext2fs_read_dir_block4(fs, physical, buffer, 0, ext2_ino_t(ino)),
                          "reading block \(logical) of directory \(ino)")
                let entries = try directoryBlockEntries(fs, ino, UnsafeMutableRawBufferPointer(start: buffer, count: Int(blockSize)),
                                                        at: logical * blockSize, from: position)
                if !entries.isEmpty { return (entries, (logical + 1) * blockSize) }
            }
            logical += 1
        }
        return ([], nil)
    }

    /// The live entries of one directory block, which starts at directory position `base`, from `position`
    /// on. Each record is checked as ext2fs_process_dir_block checks it.
    func directoryBlockEntries(_ fs: ext2_filsys, _ ino: UInt64, _ block: UnsafeMutableRawBufferPointer,
                                       at base: UInt64, from position: UInt64) throws(VolumeError) -> [DirectoryEntry] {
        var entries: [DirectoryEntry] = []
        var offset = 0
        while offset + 8 < block.count {
            // Records start 4-byte aligned (checked below) in an 8-byte aligned buffer.
            let dirent = (block.baseAddress! + offset).assumingMemoryBound(to: ext2_dir_entry.self)
            var length: UInt32 = 0
            try check(ext2fs_get_rec_len(fs, dirent, &length), "reading directory \(ino)")
            guard length >= 8, length % 4 == 0, offset + Int(length) <= block.count,
                  Self.direntNameOffset + Int(ext2fs_dirent_name_len(dirent)) <= Int(length) else {
                throw VolumeError(Self.errno(errcode_t(EXT2_ET_DIR_CORRUPTED)),
                                  "directory \(ino) has a bad entry at position \(base + UInt64(offset))")
            }
            if let e = Self.entry(dirent, at: base + UInt64(offset), from: position) { entries.append(e) }
            offset += Int(length)
        }
        return entries
    }

    static let direntNameOffset = MemoryLayout<ext2_dir_entry>.offset(of: \ext2_dir_entry.name)!

    /// The entry a directory record at position `at` names, if it is live and not before `position`.
    /// libext2fs or the caller has checked that the name lies within the record.
    static func entry(_ dirent: UnsafePointer<ext2_dir_entry>, at: UInt64, from position: UInt64) -> DirectoryEntry? {
        guard dirent.pointee.inode != 0, at >= position else { return nil }
        let name = String(decoding: UnsafeRawBufferPointer(start: UnsafeRawPointer(dirent) + direntNameOffset,
                                                           count: Int(ext2fs_dirent_name_len(dirent))), as: UTF8.self)
        return DirectoryEntry(name: name, ino: UInt64(dirent.pointee.inode),
                              type: mode(fromFileType: ext2fs_dirent_file_type(dirent)), cookie: at + 1)
    }

    /// A directory of a few entries kept in the inode (the inline_data feature): i_block holds the parent
    /// and then entries, the system.data xattr more. libext2fs walks both areas (empty records included,
    /// so that each area shows itself by its buffer); positions follow kernel ext4's for such a directory
    /// (fs/ext4/inline.c, ext4_read_inline_dir), where the entries land when it grows into a block:
    /// "." at 0, ".." at 12, i_block's entries from 24, the xattr's from 24 + 56.
    func inlineDirectoryEntries(_ fs: ext2_filsys, _ ino: UInt64,
                                        from position: UInt64) throws(VolumeError) -> [DirectoryEntry] {
        final class Context {
            var entries: [DirectoryEntry] = []
            /// The buffers libext2fs passes for i_block's area, then the xattr's.
            var areas: [UnsafeMutablePointer<CChar>] = []
            let from: UInt64
            init(from: UInt64) { self.from = from }
        }
        let context = Context(from: position)
        let rc = withExtendedLifetime(context) {
            ext2fs_dir_iterate2(fs, ext2_ino_t(ino), DIRENT_FLAG_INCLUDE_EMPTY, nil, { _, _, dirent, offset, _, buf, priv in
                let context = Unmanaged<Context>.fromOpaque(priv!).takeUnretainedValue()
                guard let dirent, let buf else { return 0 }
                let base: UInt64
                // The name's bytes only: the record may end its buffer well before a whole ext2_dir_entry.
                let nameLength = Int(ext2fs_dirent_name_len(dirent))
                let name = UnsafeRawBufferPointer(start: UnsafeRawPointer(dirent) + Volume.direntNameOffset, count: nameLength)
                if dirent.pointee.inode != 0 && !context.areas.contains(buf) && (1...2).contains(nameLength)
                    && name.allSatisfy({ $0 == UInt8(ascii: ".") }) {
                    // libext2fs makes up "." and ".." (the parent is i_block's first word).
                    base = nameLength == 1 ? 0 : 12
                } else {
                    if !context.areas.contains(buf) { context.areas.append(buf) }
                    base = context.areas.count == 1 ? 24 : 24 + 56
                }
                if let e = Volume.entry(dirent, at: base + UInt64(offset), from: context.from) { context.entries.append(e) }
                return 0
            }, Unmanaged.passUnretained(context).toOpaque())
        }
        try check(rc, "reading directory \(ino)")
        return context.entries
    }

    public func readlink(_ ino: UInt64) throws(VolumeError) -> String {
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 == 0o120000 else {
                throw VolumeError(.invalidArgument, "inode \(ino) is not a symbolic link")
            }
            let size = Int(inode.i_size)
            let fast = withUnsafeMutablePointer(to: &inode) {
                $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_is_fast_symlink($0) }
            }
            if fast != 0 {
                return withUnsafeBytes(of: &inode.i_block) { String(decoding: $0.prefix(size), as: UTF8.self) }
            }
            let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
            defer { bytes.deallocate() }
            let n = try readData(fs, ino, 0, bytes)
            return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[0..<n]), as: UTF8.self)
        }
    }

    /// Reads file data. Extent-mapped files (every regular ext4 file that is not inline) take
    /// the fast path:
    ///
    /// 1. under the lock: read the inode, resolve the requested range into runs of physically
    ///    consecutive blocks by walking the extent tree once (`mapRuns`), and note the channel's
    ///    free generation;
    /// 2. without the lock: one `BlockDevice.read` per run. The pool is thread-safe, so the
    ///    kernel's parallel read-ahead requests overlap their device I/O, and other requests
    ///    (getattr, lookup, writes) do not queue behind a read's I/O;
    /// 3. under the lock again: if any block of the filesystem was freed meanwhile (a truncate,
    ///    punch or unlink, counted by libext2fs's block-allocation callback), a mapped block may
    ///    have been reused by another file, so the read is redone with the device reads under
    ///    the lock. Otherwise the data is what the file held when it was mapped.
    ///
    /// Overlapping writes to the same range are not ordered against the unlocked read; through
    /// FUSE they never overlap, because the kernel reads only pages it has no dirty copy of.
    public func read(_ ino: UInt64, at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) -> Int {
        enum Plan {
            case done(Int)
            case runs(ReadPlan)
        }
        let plan = try withFS { fs throws(VolumeError) -> Plan in
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 != 0o040000 else { throw VolumeError(.isDirectory, "inode \(ino) is a directory") }
            if inode.i_flags & UInt32(EXT4_EXTENTS_FL) != 0 && inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0,
               let plan = try planExtentRead(fs, ino, &inode, offset, buffer.count) {
                return .runs(plan)
            }
            return .done(try readData(fs, ino, offset, buffer))
        }
        guard case .runs(let runs) = plan else {
            if case .done(let n) = plan { return n }
            return 0
        }
        if runs.length == 0 { return 0 }
        try execute(runs, ino, offset, buffer)
        let stillValid = try withFS { fs throws(VolumeError) in
            handleEpoch == runs.epoch && channelState(fs.pointee.io).freeGeneration == runs.generation
        }
        if stillValid { return runs.length }
        // A block was freed while the device reads ran: map and read again, all under the lock.
        return try withFS { fs throws(VolumeError) -> Int in
            var inode = try readInode(fs, ino)
            guard let again = try planExtentRead(fs, ino, &inode, offset, buffer.count) else {
                return try readData(fs, ino, offset, buffer)
            }
            try execute(again, ino, offset, buffer)
            return again.length
        }
    }

    /// What `read` resolves under the lock and reads without it.
    struct ReadPlan {
        /// One run of the file: `length` bytes at file offset `offset + start`, read from device
        /// offset `device` (nil: a hole or an unwritten extent, which reads as zeros).
        struct Run {
            var start: Int
            var length: Int
            var device: UInt64?
        }
        var runs: [Run] = []
        /// The bytes the read returns (the request, clamped to the file size).
        var length = 0
        var generation: UInt64 = 0
        var epoch: UInt64 = 0
        var device: BlockDevice?
    }

    /// Resolves `count` bytes at `offset` of an extent-mapped inode into device runs. Nil when
    /// the channel's dirty blocks cannot be written back first (the device is full): the read
    /// must then go through the channel, which lays them over what the device has.
    func planExtentRead(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, _ offset: UInt64,
                                _ count: Int) throws(VolumeError) -> ReadPlan? {
        let channel = channelState(fs.pointee.io)
        var plan = ReadPlan(generation: channel.freeGeneration, epoch: handleEpoch, device: channel.device)
        let size = fileSize(inode)
        guard offset < size, count > 0 else { return plan }
        let end = min(offset + UInt64(count), size)
        plan.length = Int(end - offset)
        let bs = UInt64(fs.pointee.blocksize)
        // The channel may hold written-back-later blocks: the device must see them first.
        guard channel.writeBackDirtyUnlessFailing() else {
            logger.debug("reading through the channel: its dirty blocks could not be written back", metadata: ["ino": "\(ino)"])
            return nil
        }
        let first = offset / bs, last = (end - 1) / bs
        for m in try mapRuns(fs, ino, &inode, first: first, last: last) {
            // The run's bytes within [offset, end).
            let from = max(offset, m.logical * bs), to = min(end, (m.logical + m.count) * bs)
            guard from < to else { continue }
            let device = m.physical.map { $0 * bs + (from - m.logical * bs) }
            if let lastRun = plan.runs.last, lastRun.start + lastRun.length == Int(from - offset),
               (lastRun.device == nil && device == nil)
                || (lastRun.device != nil && device != nil && lastRun.device! + UInt64(lastRun.length) == device!) {
                plan.runs[plan.runs.count - 1].length += Int(to - from)
            } else {
                plan.runs.append(.init(start: Int(from - offset), length: Int(to - from), device: device))
            }
        }
        return plan
    }

    /// Runs of blocks `first...last` of an extent-mapped inode: consecutive logical blocks that
    /// are consecutive on the device (`physical` set) or that read as zeros (holes and unwritten
    /// extents, `physical` nil). The extent tree is walked once: a goto to the first block, then
    /// leaf by leaf, rather than a lookup per block. Bigalloc filesystems (whose clusters may be
    /// mapped implicitly) take the per-block `ext2fs_bmap2` route.
    func mapRuns(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, first: UInt64,
                         last: UInt64) throws(VolumeError) -> [(logical: UInt64, count: UInt64, physical: UInt64?)] {
        var runs: [(logical: UInt64, count: UInt64, physical: UInt64?)] = []
        if fs.pointee.cluster_ratio_bits != 0 {
            for lblk in first...last {
                var physical: blk64_t = 0
                var flags: Int32 = 0
                let rc = withUnsafeMutablePointer(to: &inode) {
                    $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_bmap2(fs, ext2_ino_t(ino), $0, nil, 0, lblk, &flags, &physical) }
                }
                try check(rc, "mapping block \(lblk) of inode \(ino)")
                let data = physical != 0 && flags & BMAP_RET_UNINIT == 0
                runs.append((lblk, 1, data ? physical : nil))
            }
            return runs
        }
        var handle: ext2_extent_handle_t?
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_extent_open2(fs, ext2_ino_t(ino), $0, &handle) }
        }
        try check(rc, "opening the extent tree of inode \(ino)")
        defer { ext2fs_extent_free(handle) }
        var extent = ext2fs_extent()
        var pos = first
        // Position on the extent holding `first`, or the nearest one before or after it.
        var rcGoto = ext2fs_extent_goto2(handle, 0, blk64_t(first))
        if rcGoto == EXT2_ET_EXTENT_NOT_FOUND || rcGoto == EXT2_ET_EXTENT_NO_NEXT { rcGoto = 0 }
        try check(rcGoto, "finding block \(first) of inode \(ino)")
        var have = ext2fs_extent_get(handle, EXT2_EXTENT_CURRENT, &extent) == 0
        while pos <= last {
            // Skip extents that end at or before pos (the goto may leave us on the one before a hole).
            while have && extent.e_lblk + UInt64(extent.e_len) <= pos {
                have = ext2fs_extent_get(handle, EXT2_EXTENT_NEXT_LEAF, &extent) == 0
            }
            guard have, extent.e_len > 0 else {
                runs.append((pos, last - pos + 1, nil))   // past the last extent: a hole to the end
                break
            }
            if extent.e_lblk > pos {
                let n = min(extent.e_lblk, last + 1) - pos
                runs.append((pos, n, nil))
                pos += n
                continue
            }
            let n = min(extent.e_lblk + UInt64(extent.e_len), last + 1) - pos
            let unwritten = extent.e_flags & UInt32(EXT2_EXTENT_FLAGS_UNINIT) != 0
            runs.append((pos, n, unwritten ? nil : extent.e_pblk + (pos - extent.e_lblk)))
            pos += n
        }
        return runs
    }

    /// The device reads of a plan: each data run straight from the device, holes zero-filled.
    func execute(_ plan: ReadPlan, _ ino: UInt64, _ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) {
        for run in plan.runs {
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[run.start..<(run.start + run.length)])
            guard let at = run.device, let device = plan.device else {
                slice.initializeMemory(as: UInt8.self, repeating: 0)
                continue
            }
            do {
                try device.read(into: slice, at: at)
            } catch {
                throw VolumeError(Errno(reporting: error), "reading inode \(ino) at \(offset + UInt64(run.start)): \(error)")
            }
        }
    }

    func openFile(_ fs: ext2_filsys, _ ino: UInt64, write: Bool) throws(VolumeError) -> ext2_file_t {
        var file: ext2_file_t?
        try check(ext2fs_file_open2(fs, ext2_ino_t(ino), nil, write ? EXT2_FILE_WRITE : 0, &file), "opening inode \(ino)")
        return file!
    }

    func readData(_ fs: ext2_filsys, _ ino: UInt64, _ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws(VolumeError) -> Int {
        let file = try openFile(fs, ino, write: false)
        defer { ext2fs_file_close(file) }
        try check(ext2fs_file_llseek(file, offset, EXT2_SEEK_SET, nil), "seeking inode \(ino) to \(offset)")
        var done = 0
        while done < buffer.count {
            var got: UInt32 = 0
            let want = UInt32(min(buffer.count - done, 1 << 30))
            try check(ext2fs_file_read(file, buffer.baseAddress! + done, want, &got), "reading inode \(ino) at \(offset + UInt64(done))")
            if got == 0 { break }
            done += Int(got)
        }
        return done
    }

    public func statfs() throws(VolumeError) -> FileSystemStatistics {
        let stats = try withFS { fs throws(VolumeError) in
            let sb = fs.pointee.super.pointee
            let blocks = UInt64(sb.s_blocks_count) | UInt64(sb.s_blocks_count_hi) << 32
            let free = UInt64(sb.s_free_blocks_count) | UInt64(sb.s_free_blocks_hi) << 32
            let reserved = UInt64(sb.s_r_blocks_count) | UInt64(sb.s_r_blocks_count_hi) << 32
            // Like the kernel's ext4_statfs, metadata overhead is not counted in f_blocks... libext2fs
            // does not track it; the totals here are the superblock's.
            return FileSystemStatistics(blockSize: UInt64(fs.pointee.blocksize), blocks: blocks, freeBlocks: free,
                                        availableBlocks: free > reserved ? free - reserved : 0,
                                        files: UInt64(sb.s_inodes_count), freeFiles: UInt64(sb.s_free_inodes_count),
                                        nameMax: 255)
        }
        return try limitedByPool(stats)
    }

    /// A container must not believe it has more space than the pool can give: free and
    /// available blocks are capped by the pool's free data space, which the device reports
    /// through every wrapper (a `VolumeGroup` member, a kernel pool's /dev/mapper node).
    /// Available blocks leave out the pool's reserve for metadata, as ext4's own available
    /// count leaves out its root reserve: file data cannot have it.
    /// The cap errs low: an ext4 block freed but still mapped in the pool takes no pool space
    /// when reused. A pool status that cannot be read fails statfs (EIO), rather than showing
    /// the ext4's free space as if the pool had it.
    func limitedByPool(_ s: FileSystemStatistics) throws(VolumeError) -> FileSystemStatistics {
        let space: PoolFreeSpace?
        do { space = try device.freeSpace() } catch {
            throw VolumeError(Errno(reporting: error), "reading the pool's free data space for statfs: \(error)")
        }
        guard let space else { return s }
        var r = s
        r.freeBlocks = min(s.freeBlocks, space.free / s.blockSize)
        r.availableBlocks = min(s.availableBlocks, space.forFileData / s.blockSize)
        return r
    }
}
