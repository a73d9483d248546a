internal import CExt2fs
import Foundation
import Logging
import SystemPackage
import ThinFSCore

// The write path: write, fallocate and seek.

extension Volume {
    public func write(_ ino: UInt64, at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(VolumeError) -> Int {
        try requireWritable("write")
        do {
            return try writeOnce(ino, at: offset, from: buffer)
        } catch where error.errno == .noSpace && device.spaceFreedAtCommit {
            // A thin pool hands out the blocks freed since its last commit (an rm just now) only
            // after the next one; dm-thin commits when it runs out of data space for the same
            // reason. A commit is consistent once the filesystem is flushed: fsync does both.
            logger.debug("out of space with space freed since the last commit: committing, then writing again", metadata: ["ino": "\(ino)"])
            guard (try? fsync(nil)) != nil else { throw error }
            return try writeOnce(ino, at: offset, from: buffer)
        }
    }

    /// Writes of this many bytes or more to an extent-mapped file move their whole blocks to the
    /// device outside the volume's lock (the three steps of WritesInFlight.swift): the kernel's
    /// write-back sends WRITEs of 128 KiB to 1 MiB, and their device I/O was most of the time the
    /// lock was held, with every other request queued behind it (session 12's profile). Smaller
    /// writes (the small files of an untar, a database page) stay in one critical section: their
    /// I/O is short, and the unlocked path adds a second turn of the lock and the data gate.
    static let unlockedWriteMinimum = 64 << 10

    func writeOnce(_ ino: UInt64, at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws(VolumeError) -> Int {
        // Every write holds its range, smaller ones too: a failed unlocked write unmaps blocks
        // that held no data before it, which must not be blocks another write filled meanwhile.
        // Rounded out to 64 KiB, the largest ext4 block, so that writes sharing a block overlap.
        let align = UInt64(64 << 10)
        let (end, overflow) = offset.addingReportingOverflow(UInt64(buffer.count) + align - 1)
        let reservation = writesInFlight.reserve(ino, (offset / align * align)..<(overflow ? .max : end / align * align))
        defer { writesInFlight.release(reservation) }
        guard buffer.count >= Self.unlockedWriteMinimum else {
            return try withFS { fs throws(VolumeError) in try writeStart(fs, ino, offset, buffer, unlocked: false) }.written
        }
        return try dataGate.withReadLock { () throws(VolumeError) -> Int in
            let started = try withFS { fs throws(VolumeError) in try writeStart(fs, ino, offset, buffer, unlocked: true) }
            guard let pending = started.pending else { return started.written }
            let failure = writeRuns(pending, buffer)
            return try withFS { fs throws(VolumeError) in try writeFinish(fs, pending, buffer, failure: failure) }
        }
    }

    /// What step 1 of an unlocked write leaves for steps 2 and 3 (WritesInFlight.swift).
    struct PendingWrite {
        let ino: UInt64
        let offset: UInt64
        /// The whole blocks to write without the lock, as runs of consecutive device blocks.
        let runs: [(logical: UInt64, count: UInt64, physical: UInt64)]
        /// The block after the write's last whole block: the size grows to it.
        let endWhole: UInt64
        let sizeBefore: UInt64
        /// The size step 1 left (its head block may have grown the file): a failed write puts
        /// `sizeBefore` back only if nothing changed the size since.
        let sizeAfterStart: UInt64
        /// The write's blocks that held no data before it (holes, unwritten extents, whole blocks
        /// past the old end): what a failure unmaps.
        let noData: [(logical: UInt64, count: UInt64)]
        let blockSize: UInt64
        let device: BlockDevice
    }

    /// Step 1 of a write, under the lock: the whole write when `unlocked` is false or the file
    /// cannot take the unlocked path (`pending` nil); else everything up to the whole blocks'
    /// data, which `pending` describes.
    func writeStart(_ fs: ext2_filsys, _ ino: UInt64, _ offset: UInt64, _ buffer: UnsafeRawBufferPointer,
                    unlocked: Bool) throws(VolumeError) -> (written: Int, pending: PendingWrite?) {
        var inode = try readInode(fs, ino)
        guard UInt32(inode.i_mode) & 0o170000 == 0o100000 else {
            throw VolumeError(UInt32(inode.i_mode) & 0o170000 == 0o040000 ? .isDirectory : .invalidArgument, "write to inode \(ino), not a regular file")
        }
        guard buffer.count > 0 else { return (0, nil) }
        // Allocate the blocks the write covers whole in one go: ext2fs_file_write would allocate
        // them one at a time, searching the bitmap from its goal each time, which dominated
        // sequential writes. Only whole blocks: a partially written new block must read zeros
        // elsewhere, which ext2fs_file_write guarantees for blocks it allocates itself.
        let bs = UInt64(fs.pointee.blocksize)
        let firstWhole = (offset + bs - 1) / bs, endWhole = (offset + UInt64(buffer.count)) / bs
        let sizeBefore = fileSize(inode)
        let channel = channelState(fs.pointee.io)
        // The blocks libext2fs allocates from here on: what a failure must give back (`releaseUnheld`).
        channel.allocations = []
        defer { channel.allocations = nil }
        var done = 0
        let extentMapped = inode.i_flags & UInt32(EXT4_EXTENTS_FL) != 0 && inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0
            && fs.pointee.cluster_ratio_bits == 0
        // The write's blocks inside the file as they are before it: those that hold no data
        // (holes, preallocated ranges) are what a failure must unmap again (`releaseUnwritten`);
        // past the end, restoring the size does it.
        var inside: [(logical: UInt64, count: UInt64, physical: UInt64?)] = []
        let lastInside = offset < sizeBefore ? (min(offset + UInt64(buffer.count), sizeBefore) - 1) / bs : 0
        if extentMapped && offset < sizeBefore { inside = try mapRuns(fs, ino, &inode, first: offset / bs, last: lastInside) }
        let noData = inside.filter { $0.physical == nil }.map { (logical: $0.logical, count: $0.count) }
        do throws(VolumeError) {
            // An overwrite (a database page, a rewrite) has every whole block mapped and
            // written already: then nothing to allocate, and no inode to store for it.
            var whole: [(logical: UInt64, count: UInt64, physical: UInt64?)] = []
            if endWhole > firstWhole && extentMapped {
                // Inside the file, the map just read covers them: no second walk of the extent tree.
                whole = !inside.isEmpty && endWhole - 1 <= lastInside ? Self.clip(inside, firstWhole, endWhole - 1)
                    : try mapRuns(fs, ino, &inode, first: firstWhole, last: endWhole - 1)
            }
            if endWhole > firstWhole && (whole.isEmpty || whole.contains { $0.physical == nil }) {
                whole = []
                let rc = allocateBlocks(fs, ino, &inode, flags: EXT2_FALLOCATE_FORCE_INIT | EXT2_FALLOCATE_INIT_BEYOND_EOF,
                                        firstWhole, endWhole - firstWhole)
                // What fallocate got done is in `inode` (its extents, i_blocks): store it even if it
                // failed part-way (zeroing new blocks on a full pool), so the failure path below
                // releases a consistent allocation.
                try writeInode(fs, ino, &inode)
                try check(rc, "allocating blocks \(firstWhole)..<\(endWhole) of inode \(ino)")
            }
            // The blocks libext2fs writes from here to the last close are the file's data, and
            // the inode table and extent blocks that go with it (see `fileDataMode`).
            channel.fileDataMode = true
            defer { channel.fileDataMode = false }
            func writeThroughFile(_ at: Int, _ count: Int) throws(VolumeError) {
                try self.writeThroughFile(fs, ino, offset, buffer, at: at, count: count)
                if count > 0 { done = max(done, at + count) }
            }
            if endWhole > firstWhole && extentMapped {
                // The bulk path: the whole blocks, allocated above, go to the device in runs of
                // physically consecutive blocks, one device write each, instead of a block at a
                // time through ext2fs_file_write with a bmap and an inode write per block.
                let head = Int(firstWhole * bs - offset)
                if head > 0 {
                    try writeThroughFile(0, head)
                    // Read again: the head's write may have changed the extent tree.
                    inode = try readInode(fs, ino)
                    whole = []
                }
                // Unwritten (preallocated) extents in the range: fio and databases preallocate,
                // and libext2fs would convert them a block at a time (ext2fs_extent_set_bmap, a
                // leaf checksum per block). Release them and allocate initialized blocks in their
                // place, two extent operations per run; the data written below fills them.
                if whole.isEmpty { whole = try mapRuns(fs, ino, &inode, first: firstWhole, last: endWhole - 1) }
                let unwritten = whole.filter { $0.physical == nil }
                for run in unwritten {
                    let last = run.logical + run.count - 1
                    try check(punch(fs, ino, &inode, run.logical, last), "releasing the unwritten blocks \(run.logical)...\(last) of inode \(ino)")
                    let allocated = allocateBlocks(fs, ino, &inode, flags: EXT2_FALLOCATE_FORCE_INIT | EXT2_FALLOCATE_INIT_BEYOND_EOF,
                                                   run.logical, run.count)
                    try writeInode(fs, ino, &inode)
                    try check(allocated, "allocating blocks \(run.logical)...\(last) of inode \(ino)")
                }
                if !unwritten.isEmpty { whole = try mapRuns(fs, ino, &inode, first: firstWhole, last: endWhole - 1) }
                if unlocked, whole.allSatisfy({ $0.physical != nil }) {
                    // Steps 2 and 3 do the rest (WritesInFlight.swift). The head's block goes to
                    // the device now: a fileDataMode stretch ends in the critical section that
                    // began it.
                    channel.fileDataMode = false
                    do {
                        try channel.writeBackFileData(dataBlocks(fs, ino, offset, head))
                    } catch {
                        throw VolumeError(Errno(reporting: error), "writing inode \(ino) at \(offset): \(error)")
                    }
                    let runs = whole.map { (logical: $0.logical, count: $0.count, physical: $0.physical!) }
                    channel.dropCopies(runs.map { (start: $0.physical, count: $0.count) }, dirtyToo: true)
                    // Whole blocks past the old end held no data either.
                    let oldEnd = max(firstWhole, (sizeBefore + bs - 1) / bs)
                    let pastEnd = oldEnd < endWhole ? [(logical: oldEnd, count: endWhole - oldEnd)] : []
                    return (0, PendingWrite(ino: ino, offset: offset, runs: runs, endWhole: endWhole,
                                            sizeBefore: sizeBefore, sizeAfterStart: fileSize(try readInode(fs, ino)),
                                            noData: noData + pastEnd, blockSize: bs, device: channel.device))
                }
                for run in whole {
                    let at = Int(run.logical * bs - offset), count = Int(run.count * bs)
                    guard let physical = run.physical else {
                        // Still unwritten (not expected after the above): libext2fs converts it.
                        try writeThroughFile(at, count)
                        continue
                    }
                    // Under the lock: one channel write each, which updates the cached copies of
                    // those blocks, so the cache stays coherent.
                    var block = physical, from = at, left = run.count
                    while left > 0 {
                        let n = min(left, 8192)   // at most 32 MiB in one pwrite
                        try check(io_channel_write_blk64(fs.pointee.io, blk64_t(block), Int32(n), buffer.baseAddress! + from),
                                  "writing inode \(ino) at \(offset + UInt64(from))")
                        block += n
                        from += Int(n * bs)
                        left -= n
                    }
                    done = max(done, at + count)
                }
                // The size grows once for the whole blocks (the tail below may grow it further).
                try growSize(fs, ino, to: endWhole * bs)
                try writeThroughFile(Int(endWhole * bs - offset), buffer.count - Int(endWhole * bs - offset))
            } else {
                try writeThroughFile(0, buffer.count)
            }
            channel.fileDataMode = false
            // The data goes to the device before the write returns: a pool out of space fails
            // this write, at write(2), rather than a write-back after it was acknowledged.
            do {
                try channel.writeBackFileData(dataBlocks(fs, ino, offset, buffer.count))
            } catch {
                throw VolumeError(Errno(reporting: error), "writing inode \(ino) at \(offset): \(error)")
            }
        } catch {
            rollBack(fs, ino, offset, buffer.count, to: sizeBefore, noData: noData)
            throw error
        }
        try touch(fs, ino)
        return (done, nil)
    }

    /// Step 2 of an unlocked write, without the lock: the whole blocks to the device, at most
    /// 32 MiB in one call. The first failure, if any.
    func writeRuns(_ pending: PendingWrite, _ buffer: UnsafeRawBufferPointer) -> VolumeError? {
        let bs = pending.blockSize
        for run in pending.runs {
            var block = run.physical, from = Int(run.logical * bs - pending.offset), left = run.count
            while left > 0 {
                let n = min(left, 8192)
                do {
                    try pending.device.writeFileData(UnsafeRawBufferPointer(rebasing: buffer[from..<(from + Int(n * bs))]), at: block * bs)
                } catch {
                    return VolumeError(Errno(reporting: error), "writing inode \(pending.ino) at \(pending.offset + UInt64(from)): \(error)")
                }
                block += n
                from += Int(n * bs)
                left -= n
            }
        }
        return nil
    }

    /// Step 3 of an unlocked write, under the lock: the size, the partial tail block and the
    /// times; or, after `failure` in step 2, what step 1 allocated given back.
    func writeFinish(_ fs: ext2_filsys, _ pending: PendingWrite, _ buffer: UnsafeRawBufferPointer,
                     failure: VolumeError?) throws(VolumeError) -> Int {
        let ino = pending.ino, offset = pending.offset, bs = pending.blockSize
        let channel = channelState(fs.pointee.io)
        channel.dropCopies(pending.runs.map { (start: $0.physical, count: $0.count) }, dirtyToo: false)
        channel.allocations = []
        defer { channel.allocations = nil }
        let sizeNow = fileSize(try readInode(fs, ino))
        do throws(VolumeError) {
            if let failure { throw failure }
            try growSize(fs, ino, to: pending.endWhole * bs)
            let tail = Int(pending.endWhole * bs - offset)
            channel.fileDataMode = true
            defer { channel.fileDataMode = false }
            try writeThroughFile(fs, ino, offset, buffer, at: tail, count: buffer.count - tail)
            channel.fileDataMode = false
            do {
                try channel.writeBackFileData(dataBlocks(fs, ino, offset + UInt64(tail), buffer.count - tail))
            } catch {
                throw VolumeError(Errno(reporting: error), "writing inode \(ino) at \(offset + UInt64(tail)): \(error)")
            }
        } catch {
            // Invariant 4: the size goes back to before the write only if nothing changed it since
            // step 1; else to what this step found.
            rollBack(fs, ino, offset, buffer.count, to: sizeNow == pending.sizeAfterStart ? pending.sizeBefore : sizeNow,
                     noData: pending.noData)
            throw error
        }
        try touch(fs, ino)
        return buffer.count
    }

    /// `count` bytes of `buffer` from `at` (a request offset) written at `offset + at` through
    /// libext2fs's file I/O, a block at a time: partial blocks, unwritten extents, inline and
    /// block-mapped files. On a failure the file is closed with `fileDataMode` as the caller set
    /// it, so the block it flushes is marked as the caller's blocks are.
    func writeThroughFile(_ fs: ext2_filsys, _ ino: UInt64, _ offset: UInt64, _ buffer: UnsafeRawBufferPointer,
                          at: Int, count: Int) throws(VolumeError) {
        guard count > 0 else { return }
        let file = try openFile(fs, ino, write: true)
        do throws(VolumeError) {
            try check(ext2fs_file_llseek(file, offset + UInt64(at), EXT2_SEEK_SET, nil), "seeking inode \(ino) to \(offset + UInt64(at))")
            var written = 0
            while written < count {
                var wrote: UInt32 = 0
                let want = UInt32(min(count - written, 1 << 30))
                try check(ext2fs_file_write(file, buffer.baseAddress! + at + written, want, &wrote),
                          "writing inode \(ino) at \(offset + UInt64(at + written))")
                if wrote == 0 { throw VolumeError(.noSpace, "writing inode \(ino): no progress") }
                written += Int(wrote)
            }
        } catch {
            ext2fs_file_close(file)
            throw error
        }
        try check(ext2fs_file_close(file), "closing inode \(ino)")
    }

    /// Grows the size of inode `ino` to `size` if it is smaller.
    func growSize(_ fs: ext2_filsys, _ ino: UInt64, to size: UInt64) throws(VolumeError) {
        var inode = try readInode(fs, ino)
        guard size > fileSize(inode) else { return }
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_inode_size_set(fs, $0, ext2_off64_t(size)) }
        }
        try check(rc, "setting the size of inode \(ino)")
        try writeInode(fs, ino, &inode)
    }

    /// A write's last step: mtime and ctime.
    func touch(_ fs: ext2_filsys, _ ino: UInt64) throws(VolumeError) {
        var inode = try readInode(fs, ino)
        let t = Self.now()
        setTimes(&inode, mtime: t, ctime: t)
        // Writing clears set-user-ID (and set-group-ID with group execute), as the kernel does for unprivileged writers.
        try writeInode(fs, ino, &inode)
    }

    /// Undoes a write that failed: what it left in the file's blocks reaches the device now or
    /// never, the size goes back to `size` if it grew, and the blocks it mapped where there was
    /// no data (`noData`, and past the end) are unmapped, with those it allocated outside the file.
    func rollBack(_ fs: ext2_filsys, _ ino: UInt64, _ offset: UInt64, _ count: Int, to size: UInt64,
                  noData: [(logical: UInt64, count: UInt64)]) {
        let channel = channelState(fs.pointee.io)
        channel.fileDataMode = false
        defer {
            // What this write left in the file's blocks reaches the device now or never
            // (the blocks released below are gone from the cache already): a block the
            // device refuses must not be written back later, after the caller heard ENOSPC.
            try? channel.writeBackFileData(dataBlocks(fs, ino, offset, count))
        }
        // A failed write does not extend the file: ext2fs_file_write has already set the
        // size to what it copied, but the block it was flushing when it failed may never
        // have reached the device, and the caller is told nothing was written.
        let bs = UInt64(fs.pointee.blocksize)
        // The blocks this write's range covers: its reservation keeps every other write out of
        // them, and nothing else it touches (WritesInFlight.swift, invariant 4).
        let own = (offset / bs)...((offset + UInt64(count) - 1) / bs)
        restoreSize(fs, ino, to: size, own: own)
        releaseBeyondEOF(fs, ino, own: own)
        releaseUnwritten(fs, ino, noData)
        let allocated = channel.allocations ?? []
        channel.allocations = nil
        releaseUnheld(fs, ino, allocated: allocated)
    }

    /// `ext2fs_fallocate` of logical blocks `first..<first + count` of inode `ino`, and of no
    /// other block. `inode` is kept current; the caller stores it.
    ///
    /// libext2fs 1.47.0 maps more than it is asked to when the range starts in the hole before
    /// the file's first extent: its extent_fallocate, finding the nearest extent beyond the
    /// start, fills the whole gap up to that extent, ignoring where the range ends. A 55-block
    /// write into a file whose only extent (a preallocation) started 409 blocks further on
    /// mapped all 463 blocks, initialized, past i_size (e2fsck: "i_size is ..., should be ...")
    /// and reading whatever the device held there. So the blocks it mapped past the range, up to
    /// the first block mapped before the call, are punched again.
    func allocateBlocks(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, flags: Int32,
                        _ first: UInt64, _ count: UInt64) -> errcode_t {
        let end = first + count
        let nextBefore = firstMappedBlock(fs, ino, &inode, atOrAfter: end)
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_fallocate(fs, flags, ext2_ino_t(ino), $0, ~0, first, count) }
        }
        guard let nextBefore, nextBefore > end,
              let nextAfter = firstMappedBlock(fs, ino, &inode, atOrAfter: end), nextAfter < nextBefore else { return rc }
        let trimmed = punch(fs, ino, &inode, nextAfter, nextBefore - 1)
        if trimmed != 0 {
            logger.warning("could not unmap blocks libext2fs's fallocate mapped past the range asked for",
                           metadata: ["ino": "\(ino)", "blocks": "\(nextAfter)..<\(nextBefore)", "error": "\(Self.message(trimmed))"])
        }
        return rc != 0 ? rc : trimmed
    }

    /// The first logical block at or after `block` that an extent of inode `ino` maps (written
    /// or unwritten); nil past the last extent, and for files that are not extent-mapped or on
    /// bigalloc (whose clusters libext2fs maps implicitly).
    func firstMappedBlock(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large, atOrAfter block: UInt64) -> UInt64? {
        guard inode.i_flags & UInt32(EXT4_EXTENTS_FL) != 0, inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0,
              fs.pointee.cluster_ratio_bits == 0 else { return nil }
        var handle: ext2_extent_handle_t?
        let opened = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_extent_open2(fs, ext2_ino_t(ino), $0, &handle) }
        }
        guard opened == 0 else { return nil }
        defer { ext2fs_extent_free(handle) }
        // On the extent holding `block`, or the nearest one before or after it.
        _ = ext2fs_extent_goto2(handle, 0, blk64_t(block))
        var extent = ext2fs_extent()
        guard ext2fs_extent_get(handle, EXT2_EXTENT_CURRENT, &extent) == 0 else { return nil }
        while extent.e_lblk + UInt64(extent.e_len) <= block {
            let previous = extent.e_lblk
            guard ext2fs_extent_get(handle, EXT2_EXTENT_NEXT_LEAF, &extent) == 0, extent.e_lblk > previous else { return nil }
        }
        return max(extent.e_lblk, block)
    }

    /// The part of `runs` (from `mapRuns`) in logical blocks `first...last`.
    static func clip(_ runs: [(logical: UInt64, count: UInt64, physical: UInt64?)], _ first: UInt64,
                     _ last: UInt64) -> [(logical: UInt64, count: UInt64, physical: UInt64?)] {
        runs.compactMap { run in
            let start = max(run.logical, first), end = min(run.logical + run.count - 1, last)
            guard start <= end else { return nil }
            return (start, end - start + 1, run.physical.map { $0 + (start - run.logical) })
        }
    }

    /// The device blocks holding bytes `offset..<offset + count` of inode `ino`, as runs: where
    /// `write` put the file's data. Empty for files that are not extent-mapped (their data is
    /// then written back as metadata is).
    func dataBlocks(_ fs: ext2_filsys, _ ino: UInt64, _ offset: UInt64, _ count: Int) -> [(start: UInt64, count: UInt64)] {
        guard count > 0, var inode = try? readInode(fs, ino), inode.i_flags & UInt32(EXT4_EXTENTS_FL) != 0,
              inode.i_flags & UInt32(EXT4_INLINE_DATA_FL) == 0 else { return [] }
        let bs = UInt64(fs.pointee.blocksize)
        let runs = (try? mapRuns(fs, ino, &inode, first: offset / bs, last: (offset + UInt64(count) - 1) / bs)) ?? []
        return runs.compactMap { run in run.physical.map { (start: $0, count: run.count) } }
    }

    /// Shrinks a file a failed write extended back to `size`, touching no block outside the
    /// write's own blocks `own` (WritesInFlight.swift, invariant 4): another write to the file may
    /// be in flight past the end, its blocks initialized and its size update still to come, so
    /// this is not a truncate (`ext2fs_file_set_size2` frees every block past the new end). The
    /// bytes past `size` in its last block are zeroed if that block is the write's (any other
    /// block's tail is zeros already, as the file's end was never inside it); the write's blocks
    /// past `size` go with `releaseBeyondEOF`; then i_size is set. Best effort, like the others.
    func restoreSize(_ fs: ext2_filsys, _ ino: UInt64, to size: UInt64, own: ClosedRange<UInt64>) {
        guard let before = try? readInode(fs, ino), fileSize(before) > size else { return }
        let bs = UInt64(fs.pointee.blocksize)
        if size % bs != 0, own.contains(size / bs) {
            do { try zeroRange(fs, ino, size, min((size / bs + 1) * bs, fileSize(before))) } catch {
                logger.warning("could not zero the tail of a file's last block after a failed write",
                               metadata: ["ino": "\(ino)", "size": "\(size)", "error": "\(error)"])
            }
        }
        guard var inode = try? readInode(fs, ino) else { return }
        let rc = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { ext2fs_inode_size_set(fs, $0, ext2_off64_t(size)) }
        }
        if rc != 0 || (try? writeInode(fs, ino, &inode)) == nil {
            logger.warning("could not shrink a file back after a failed write",
                           metadata: ["ino": "\(ino)", "size": "\(size)", "error": "\(rc)"])
        }
    }

    /// A write that failed part-way (the device full: a thin pool out of data space) leaves the
    /// blocks reserved for it still mapped and initialized past the end of the file, which
    /// e2fsck rejects ("end of extent exceeds allowed value"; the kernel would have left them
    /// unwritten). Unmaps those of the write's own blocks `own` that lie wholly past the end
    /// (other blocks past the end may be another write's, in flight). Preallocated blocks there
    /// (fallocate KEEP_SIZE) go too: a failed write may lose a preallocation, never data. Best
    /// effort: the write's own error is what the caller reports.
    func releaseBeyondEOF(_ fs: ext2_filsys, _ ino: UInt64, own: ClosedRange<UInt64>) {
        guard var inode = try? readInode(fs, ino) else { return }
        let bs = UInt64(fs.pointee.blocksize)
        let end = max((fileSize(inode) + bs - 1) / bs, own.lowerBound)
        guard end <= own.upperBound else { return }
        let rc = punch(fs, ino, &inode, end, own.upperBound)
        if rc != 0 {
            logger.warning("could not release the blocks a failed write reserved past the end of the file",
                           metadata: ["ino": "\(ino)", "blocks": "\(end)...\(own.upperBound)", "error": "\(Self.message(rc))"])
        }
    }

    /// A write that failed part-way has mapped blocks in the holes and preallocated ranges it
    /// covered (`ext2fs_fallocate` of initialized blocks on the bulk path, `ext2fs_file_write`
    /// converting an unwritten block), while their data may never have reached the device or
    /// only in part: read as data, they would show whatever the device held there (a deleted
    /// file's bytes) or half a write the caller was told failed. Unmaps the blocks of `runs`
    /// (what held no data before the write) that now hold data, so they read zeros again, as
    /// the kernel's ext4 leaves an extent unwritten until its data is written. A preallocated
    /// range the write reached becomes a hole: a failed write may lose a preallocation, never
    /// data. Best effort, like `releaseBeyondEOF`.
    func releaseUnwritten(_ fs: ext2_filsys, _ ino: UInt64, _ runs: [(logical: UInt64, count: UInt64)]) {
        guard !runs.isEmpty, var inode = try? readInode(fs, ino) else { return }
        let size = fileSize(inode)
        let bs = UInt64(fs.pointee.blocksize)
        guard size > 0 else { return }
        for run in runs where run.logical * bs < size {
            let last = min(run.logical + run.count, (size + bs - 1) / bs) - 1
            guard let now = try? mapRuns(fs, ino, &inode, first: run.logical, last: last) else { continue }
            for mapped in now where mapped.physical != nil {
                let rc = punch(fs, ino, &inode, mapped.logical, mapped.logical + mapped.count - 1)
                if rc != 0 {
                    logger.warning("could not unmap the blocks a failed write left without their data",
                                   metadata: ["ino": "\(ino)", "blocks": "\(mapped.logical)+\(mapped.count)", "error": "\(Self.message(rc))"])
                }
            }
        }
    }

    /// After a failed write: releases the blocks it allocated (`allocated`, from libext2fs's
    /// allocation callbacks) that the file does not hold, and sets i_blocks to what it holds.
    /// `ext2fs_fallocate` claims each free run (bitmap and i_blocks) before it inserts the extent
    /// for it, and returns a failed insert (the run took the last free blocks, and the extent
    /// tree needed one more for a new node) with the run still claimed: in no extent, which
    /// e2fsck reports as "block bitmap differences" and a wrong i_blocks (issue 14). The kernel's
    /// ext4 gives such blocks back. Best effort, like `releaseBeyondEOF`: the walk over the file's
    /// blocks runs only on this failure path.
    private func releaseUnheld(_ fs: ext2_filsys, _ ino: UInt64, allocated runs: [(start: UInt64, count: UInt64)]) {
        // Bigalloc counts i_blocks in clusters; the bulk path that allocates in runs is off there too.
        guard !runs.isEmpty, fs.pointee.cluster_ratio_bits == 0, var inode = try? readInode(fs, ino) else { return }
        final class Walk {
            var unheld = Set<UInt64>()
            var held: UInt64 = 0
        }
        let walk = Walk()
        for run in runs {
            for b in run.start..<(run.start + run.count) where ext2fs_test_block_bitmap2(fs.pointee.block_map, blk64_t(b)) != 0 {
                walk.unheld.insert(b)
            }
        }
        // Every block the file holds (data, and extent-tree nodes with a negative blockcnt).
        let rc = ext2fs_block_iterate3(fs, ext2_ino_t(ino), BLOCK_FLAG_READ_ONLY, nil, { _, block, _, _, _, context in
            let walk = Unmanaged<Walk>.fromOpaque(context!).takeUnretainedValue()
            walk.held += 1
            walk.unheld.remove(UInt64(block!.pointee))
            return 0
        }, Unmanaged.passUnretained(walk).toOpaque())
        guard rc == 0 else {
            logger.warning("could not walk the blocks of a file after a failed write", metadata: ["ino": "\(ino)", "error": "\(rc)"])
            return
        }
        for b in walk.unheld.sorted() { ext2fs_block_alloc_stats2(fs, blk64_t(b), -1) }
        let counted = withUnsafeMutablePointer(to: &inode) {
            $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) { i -> (before: UInt64, after: UInt64) in
                let before = ext2fs_get_stat_i_blocks(fs, i)
                // An xattr block counts too, as e2fsck counts it.
                _ = ext2fs_iblk_set(fs, i, walk.held + (ext2fs_file_acl_block(fs, i) != 0 ? 1 : 0))
                return (before, ext2fs_get_stat_i_blocks(fs, i))
            }
        }
        if counted.before != counted.after { try? writeInode(fs, ino, &inode) }
        if !walk.unheld.isEmpty || counted.before != counted.after {
            logger.debug("released the blocks a failed write had allocated outside the file",
                         metadata: ["ino": "\(ino)", "blocks": "\(walk.unheld.count)", "i_blocks": "\(counted.before) -> \(counted.after)"])
        }
    }

    public func fallocate(_ ino: UInt64, mode: FallocateMode, offset: UInt64, length: UInt64) throws(VolumeError) {
        try requireWritable("fallocate")
        guard length > 0 else { throw VolumeError(.invalidArgument, "fallocate of zero bytes") }
        // It frees, zeroes or maps a file's blocks: not under a write in flight (WritesInFlight.swift).
        try withQuiescedFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            guard UInt32(inode.i_mode) & 0o170000 == 0o100000 else { throw VolumeError(.operationNotSupportedByDevice, "fallocate of inode \(ino), not a regular file") }
            let bs = UInt64(fs.pointee.blocksize)
            let size = fileSize(inode)
            if mode.contains(.zeroRange) {
                guard mode.subtracting([.zeroRange, .keepSize]).isEmpty else {
                    throw VolumeError(.notSupported, "fallocate mode \(mode.rawValue): ZERO_RANGE takes only KEEP_SIZE")
                }
                try zeroRangeMode(fs, ino, &inode, offset: offset, length: length, keepSize: mode.contains(.keepSize))
            } else if mode.contains(.punchHole) {
                guard mode.contains(.keepSize) else { throw VolumeError(.notSupported, "PUNCH_HOLE needs KEEP_SIZE") }
                // Zero partial blocks at the edges; release the whole blocks between.
                let end = min(offset + length, size)
                guard offset < end else { return }
                let firstWhole = (offset + bs - 1) / bs, endWhole = end / bs
                try zeroRange(fs, ino, offset, min(end, firstWhole * bs))
                if endWhole * bs > offset && endWhole * bs < end { try zeroRange(fs, ino, max(offset, endWhole * bs), end) }
                if firstWhole < endWhole {
                    // Zeroing an edge may have mapped or converted a block: punch the inode as it is now.
                    inode = try readInode(fs, ino)
                    try check(punch(fs, ino, &inode, firstWhole, endWhole - 1), "punching blocks \(firstWhole)..<\(endWhole) of inode \(ino)")
                    inode = try readInode(fs, ino)
                }
            } else {
                guard mode.rawValue & ~FallocateMode.keepSize.rawValue == 0 else {
                    throw VolumeError(.notSupported, "fallocate mode \(mode.rawValue)")
                }
                let first = offset / bs, last = (offset + length - 1) / bs
                let rc = allocateBlocks(fs, ino, &inode, flags: EXT2_FALLOCATE_INIT_BEYOND_EOF | EXT2_FALLOCATE_FORCE_UNINIT,
                                        first, last - first + 1)
                try check(rc, "allocating \(length) bytes at \(offset) in inode \(ino)")
                try writeInode(fs, ino, &inode)
                if !mode.contains(.keepSize) && offset + length > size {
                    let file = try openFile(fs, ino, write: true)
                    let sr = ext2fs_file_set_size2(file, ext2_off64_t(offset + length))
                    ext2fs_file_close(file)
                    try check(sr, "extending inode \(ino)")
                }
                inode = try readInode(fs, ino)
            }
            let t = Self.now()
            setTimes(&inode, mtime: t, ctime: t)
            try writeInode(fs, ino, &inode)
        }
    }

    /// FALLOC_FL_ZERO_RANGE, as ext4 does it: the range reads as zeros and stays allocated.
    /// Partial blocks at its edges are written with zeros; the whole blocks between are released
    /// and mapped again as unwritten extents (what ext4 converts them to), so no zeros are written
    /// and a thin pool gives back their space. Blocks past the end of the file are preallocated
    /// unwritten; without KEEP_SIZE the file grows to the end of the range. `inode` is read again
    /// afterwards.
    func zeroRangeMode(_ fs: ext2_filsys, _ ino: UInt64, _ inode: inout ext2_inode_large,
                               offset: UInt64, length: UInt64, keepSize: Bool) throws(VolumeError) {
        let bs = UInt64(fs.pointee.blocksize)
        let size = fileSize(inode)
        let end = offset + length
        let firstWhole = (offset + bs - 1) / bs, endWhole = end / bs
        // Bytes past the end of the file are zeros already (and hidden under KEEP_SIZE).
        let headEnd = min(end, firstWhole * bs), tailStart = max(headEnd, endWhole * bs)
        try zeroRange(fs, ino, offset, min(headEnd, size))
        try zeroRange(fs, ino, tailStart, min(end, size))
        if firstWhole < endWhole {
            // Zeroing an edge may have mapped or converted a block: punch the inode as it is now.
            inode = try readInode(fs, ino)
            try check(punch(fs, ino, &inode, firstWhole, endWhole - 1), "releasing blocks \(firstWhole)..<\(endWhole) of inode \(ino) to zero them")
        }
        // The same allocation as plain fallocate: it maps only what is unmapped, here the blocks
        // just released and any holes, and leaves the written edge blocks as they are.
        inode = try readInode(fs, ino)
        let first = offset / bs, last = (end - 1) / bs
        let rc = allocateBlocks(fs, ino, &inode, flags: EXT2_FALLOCATE_INIT_BEYOND_EOF | EXT2_FALLOCATE_FORCE_UNINIT,
                                first, last - first + 1)
        try check(rc, "allocating the zeroed range \(offset)..<\(end) of inode \(ino)")
        try writeInode(fs, ino, &inode)
        if !keepSize && end > size {
            let file = try openFile(fs, ino, write: true)
            let sr = ext2fs_file_set_size2(file, ext2_off64_t(end))
            ext2fs_file_close(file)
            try check(sr, "extending inode \(ino) to \(end)")
        }
        inode = try readInode(fs, ino)
    }

    func zeroRange(_ fs: ext2_filsys, _ ino: UInt64, _ start: UInt64, _ end: UInt64) throws(VolumeError) {
        guard start < end else { return }
        let zeros = [UInt8](repeating: 0, count: Int(end - start))
        let file = try openFile(fs, ino, write: true)
        var wrote: UInt32 = 0
        var rc = ext2fs_file_llseek(file, start, EXT2_SEEK_SET, nil)
        if rc == 0 { rc = zeros.withUnsafeBytes { ext2fs_file_write(file, $0.baseAddress!, UInt32($0.count), &wrote) } }
        // Closing writes the block out: its failure is the zeroing's.
        let closed = ext2fs_file_close(file)
        try check(rc != 0 ? rc : closed, "zeroing inode \(ino) at \(start)..<\(end)")
        if wrote != zeros.count { throw VolumeError(.noSpace, "zeroing inode \(ino) at \(start): \(wrote) of \(zeros.count) bytes written") }
    }

    public func seek(_ ino: UInt64, from offset: UInt64, to whence: SeekTarget) throws(VolumeError) -> UInt64 {
        try withFS { fs throws(VolumeError) in
            var inode = try readInode(fs, ino)
            let size = fileSize(inode)
            guard offset < size else { throw VolumeError(.init(rawValue: ENXIO), "seek past the end of inode \(ino)") }
            let bs = UInt64(fs.pointee.blocksize)
            var block = offset / bs
            let lastBlock = (size - 1) / bs
            while block <= lastBlock {
                var physical: blk64_t = 0
                var retFlags: Int32 = 0
                let rc = withUnsafeMutablePointer(to: &inode) {
                    $0.withMemoryRebound(to: ext2_inode.self, capacity: 1) {
                        ext2fs_bmap2(fs, ext2_ino_t(ino), $0, nil, 0, block, &retFlags, &physical)
                    }
                }
                try check(rc, "mapping block \(block) of inode \(ino)")
                // Unwritten (preallocated) extents read as zeros: the kernel reports them as holes too.
                let isData = physical != 0 && retFlags & BMAP_RET_UNINIT == 0
                if isData == (whence == .data) {
                    return max(offset, block * bs)
                }
                block += 1
            }
            if whence == .hole { return size }
            throw VolumeError(.init(rawValue: ENXIO), "no data after \(offset) in inode \(ino)")
        }
    }
}
