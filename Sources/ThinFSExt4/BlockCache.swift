import SystemPackage
import ThinFSCore

// The io_manager's block cache: plain Swift over a BlockDevice, no libext2fs (IOManager.swift
// holds the C side).

/// What a channel's private_data holds.
/// What a channel's private_data holds: the device, and a small block cache.
///
/// libext2fs re-reads extent-tree, bitmap and directory blocks all the time, and
/// writes a file one block at a time, rewriting its inode-table block after
/// each; unix_io keeps a write-back cache for both, and so does this manager:
///
/// - single-block reads are cached; larger reads go to the device, and the
///   dirty cached blocks they overlap are laid over what it returned;
/// - single-block writes stay in the cache, dirty, and are written back sorted
///   and coalesced into large pwrites when half the cache is dirty, and at
///   every flush, before the device's own flush (a pool commit);
/// - larger writes go straight to the device and update the cached copies they
///   overlap; discards drop them.
///
/// So the device holds everything written once a flush returns, which is all a
/// commit needs. Callbacks run under the Volume's lock; the cache's own lock
/// only makes that independent of the caller.
///
/// When the device takes no writes (a thin pool out of data space), dirty blocks
/// stay in memory, as the kernel keeps dirty pages: reads still work, the cache
/// grows past its size up to `overflowLimit` blocks, and a later write-back
/// (once the pool has grown) writes them all and shrinks it back.
final class ChannelState {
    let device: BlockDevice
    private struct Entry {
        var data: UnsafeMutableRawPointer
        var dirty: Bool
        /// Written while `fileDataMode` was set: written back with `writeFileData`.
        var fileData = false
    }
    private let lock = Lock()
    private var blocks: [UInt64: Entry] = [:]
    private var order: [UInt64] = []
    private var next = 0
    private var dirtyCount = 0
    /// The cached blocks whose `fileData` is set, always `blocks.filter { $0.value.fileData }.keys`:
    /// `writeBackFileData` visits them and the written file's blocks, not the whole cache (a
    /// filter of every cached block on each 4 KiB write was a quarter of a create's time, and grew
    /// with the cache). Kept by `setFileData` and by every removal of an entry.
    private var fileDataBlocks = Set<UInt64>()
    private var blockSize = 0
    static let capacity = 1024
    /// Set by `Volume.write` around its libext2fs file writes: the blocks written meanwhile are
    /// file data, which the device writes with `writeFileData`, leaving a thin pool's reserve to
    /// the filesystem's metadata (`UserspaceThinPool.reservedDataBlocks`), until
    /// `writeBackFileData` says which of them were (libext2fs writes the inode table and extent
    /// blocks meanwhile too). Read and written under the Volume's lock only.
    var fileDataMode = false
    /// Counts libext2fs's block frees (see `countBlockFrees`). Read and written under the Volume's
    /// lock only: unlocked file reads compare it before and after their device I/O.
    var freeGeneration: UInt64 = 0
    /// While set (a `Volume.write` under way), every block libext2fs allocates is appended, so
    /// that a failed write can give back what no extent took (`Volume.releaseUnheld`). Read and
    /// written under the Volume's lock only.
    var allocations: [(start: UInt64, count: UInt64)]?

    /// `writeBack`'s staging buffer for coalesced runs (1 MiB), kept from one call to the next:
    /// allocated on every call, it cost an mmap, a page fault per page touched and an munmap with a
    /// TLB shootdown on every CPU for each file an untar wrote (one write-back per WRITE request).
    private var runBuffer: (pointer: UnsafeMutableRawPointer, bytes: Int)?

    init(device: BlockDevice) { self.device = device }
    deinit {
        for e in blocks.values { e.data.deallocate() }
        runBuffer?.pointer.deallocate()
    }

    func setBlockSize(_ size: Int) throws {
        try lock.withLock {
            discardFreedRun()
            guard size != blockSize else { return }
            try writeBack()
            for e in blocks.values { e.data.deallocate() }
            blocks.removeAll()
            fileDataBlocks.removeAll()
            order.removeAll()
            next = 0
            blockSize = size
        }
    }

    /// Dirty blocks held past `capacity` while write-back fails: 64 MiB of 4K blocks.
    static let overflowLimit = 16 * capacity
    /// After a failed write-back, when to try again: at this dirty count, or a second later
    /// (the pool may have grown); flushes always try. Every insert retrying a write-back the
    /// device refuses would cost a pwrite per dirty run.
    private var retryWriteBack: (dirtyCount: Int, time: ContinuousClock.Instant)?

    /// A write-back now, unless one failed recently (see `retryWriteBack`) and `force` is
    /// false. False if the dirty blocks are still dirty.
    private func writeBackUnlessFailing(force: Bool = false) -> Bool {
        guard dirtyCount > 0 else { return true }
        if !force, let retry = retryWriteBack, dirtyCount < retry.dirtyCount, ContinuousClock.now < retry.time { return false }
        do {
            try writeBack()
            retryWriteBack = nil
            return true
        } catch {
            retryWriteBack = (dirtyCount + Self.capacity / 2, ContinuousClock.now + .seconds(1))
            return false
        }
    }

    func read(_ block: UInt64, _ count: Int32, _ data: UnsafeMutableRawPointer, _ r: (offset: UInt64, length: Int)) throws {
        try lock.withLock {
            discardFreedRun()
            if count == 1, r.length == blockSize, let hit = blocks[block] {
                data.copyMemory(from: hit.data, byteCount: r.length)
                return
            }
            try device.read(into: UnsafeMutableRawBufferPointer(start: data, count: r.length), at: r.offset)
            // Dirty cached blocks are newer than the device: lay them over what was read. (Not a
            // write-back first: on a full thin pool it fails, and reads must keep working.)
            if dirtyCount > 0 {
                for s in shared(r) where s.entry.dirty {
                    data.advanced(by: s.inRange).copyMemory(from: s.entry.data.advanced(by: s.inBlock), byteCount: s.count)
                }
            }
            if count == 1, r.length == blockSize { try insert(block, data, dirty: false) }
        }
    }

    func write(_ block: UInt64, _ count: Int32, _ data: UnsafeRawPointer, _ r: (offset: UInt64, length: Int)) throws {
        try lock.withLock {
            writeCalls += 1
            discardFreedRun()
            if count == 1, r.length == blockSize, blockSize > 0 {
                try insert(block, data, dirty: true)
                return
            }
            let bytes = UnsafeRawBufferPointer(start: data, count: r.length)
            if fileDataMode { try device.writeFileData(bytes, at: r.offset) } else { try device.write(bytes, at: r.offset) }
            guard blockSize > 0, !blocks.isEmpty, r.length > 0 else { return }
            // Keep overlapping cached copies current (a dirty one stays dirty: its other bytes are newer than the device).
            for s in shared(r) {
                s.entry.data.advanced(by: s.inBlock).copyMemory(from: data.advanced(by: s.inRange), byteCount: s.count)
            }
        }
    }

    func discard(_ r: (offset: UInt64, length: Int)) throws {
        try lock.withLock {
            discardFreedRun()
            // Discarded bytes are gone: drop the cached copies, dirty or not, then unmap.
            for b in overlapping(r) { drop(b) }
            try device.discard(offset: r.offset, length: UInt64(r.length))
        }
    }

    /// Blocks the filesystem has just freed (libext2fs's allocation callbacks): their cached
    /// copies go now (a dirty one written back later would map the block again), and the
    /// device unmaps them, so that a thin pool gets the space back (the whole pool blocks
    /// among them) as the kernel's ext4 gives it back with `-o discard`. Without it, `rm` in a
    /// container on a full pool freed nothing in the pool, and new data in the freed ext4
    /// blocks needed new pool blocks.
    ///
    /// libext2fs frees a file's blocks one at a time (punch.c), so consecutive frees gather
    /// into one discard, sent before the channel's next I/O (`discardFreedRun`).
    func discardFreed(_ block: UInt64, count: UInt64) {
        lock.withLock {
            guard blockSize > 0, count > 0 else { return }
            for b in overlapping((block * UInt64(blockSize), Int(count) * blockSize)) { drop(b) }
            if let run = freedRun, run.start + run.count == block {
                freedRun = (run.start, run.count + count)
                return
            }
            discardFreedRun()
            freedRun = (block, count)
        }
    }

    /// Ends a `fileDataMode` write (`Volume.write`, before it returns): the dirty blocks in
    /// `runs`, the file's data, are written back now with `writeFileData`, and those the device
    /// refuses (a thin pool down to its reserve) are dropped, never written later: the write
    /// that made them fails, and the caller hears it. The other blocks written meanwhile are
    /// metadata (the inode table, extent blocks): they lose the file-data mark and are written
    /// back with the rest, never dropped.
    func writeBackFileData(_ runs: [(start: UInt64, count: UInt64)]) throws {
        try lock.withLock {
            discardFreedRun()
            var data = Set<UInt64>()
            for run in runs {
                // A long run covers few cached blocks: then walk the cache instead of the run.
                if run.count < UInt64(blocks.count) {
                    for b in run.start..<(run.start + run.count) where blocks[b] != nil { data.insert(b) }
                } else {
                    data.formUnion(blocks.keys.filter { $0 >= run.start && $0 < run.start + run.count })
                }
            }
            // Only blocks marked since the last call can carry the mark (every call ends with none):
            // those outside `runs` are metadata.
            for b in fileDataBlocks where !data.contains(b) { setFileData(b, false) }
            for b in data { setFileData(b, true) }
            defer { for b in data { setFileData(b, false) } }
            do {
                try writeBack(only: data)
            } catch {
                for b in data where blocks[b]?.dirty == true { drop(b) }
                throw error
            }
        }
    }

    /// Around an unlocked write of whole blocks (`Volume.write`, WritesInFlight.swift, invariant
    /// 3): sends a pending discard, which may cover `runs` (blocks freed and allocated again
    /// since), and drops the cached copies of `runs`. Before the write (`dirtyToo`) every copy
    /// goes, since the write replaces every byte; after it only clean ones, a dirty one being
    /// newer than anything read before.
    func dropCopies(_ runs: [(start: UInt64, count: UInt64)], dirtyToo: Bool) {
        lock.withLock {
            discardFreedRun()
            let bs = UInt64(blockSize)
            guard bs > 0 else { return }
            for run in runs {
                for b in overlapping((run.start * bs, Int(run.count * bs))) where dirtyToo || blocks[b]?.dirty == false { drop(b) }
            }
        }
    }

    var counts: (total: Int, dirty: Int) { lock.withLock { (order.count, dirtyCount) } }
    /// Calls of `write` (see `Volume.channelWriteCount`).
    private(set) var writeCalls = 0

    /// Writes back every dirty block without flushing the device.
    func writeBackDirty() throws {
        try lock.withLock {
            discardFreedRun()
            try writeBack()
        }
    }

    /// `writeBackDirty` unless one failed recently; false if dirty blocks remain.
    func writeBackDirtyUnlessFailing() -> Bool {
        lock.withLock {
            discardFreedRun()
            return writeBackUnlessFailing()
        }
    }

    /// Writes back every dirty block, then flushes the device (a pool commit on a thin device).
    func flush() throws {
        try lock.withLock {
            discardFreedRun()
            try writeBack()
            retryWriteBack = nil
        }
        try device.flush()
    }

    // MARK: Under the lock

    /// Consecutive freed blocks not yet discarded (see `discardFreed`).
    private var freedRun: (start: UInt64, count: UInt64)?

    /// Discards `freedRun`. Before every other I/O, so that a freed block written again (newly
    /// allocated) is discarded before it is written, never after. Best effort: a failed discard
    /// leaves the blocks mapped, as they were.
    private func discardFreedRun() {
        guard let run = freedRun else { return }
        freedRun = nil
        // Less than 64 KiB, the smallest thin-pool block, never unmaps anything: not worth a call.
        let bs = UInt64(blockSize)
        guard bs > 0, run.count * bs >= 64 << 10 else { return }
        try? device.discard(offset: run.start * bs, length: run.count * bs)
    }

    /// Sets the `fileData` mark of cached block `b`, keeping `fileDataBlocks`.
    private func setFileData(_ b: UInt64, _ value: Bool) {
        guard blocks[b] != nil, blocks[b]!.fileData != value else { return }
        blocks[b]!.fileData = value
        if value { fileDataBlocks.insert(b) } else { fileDataBlocks.remove(b) }
    }

    /// Removes block `b` from the cache, dirty or not.
    private func drop(_ b: UInt64) {
        guard let e = blocks.removeValue(forKey: b) else { return }
        fileDataBlocks.remove(b)
        if e.dirty { dirtyCount -= 1 }
        e.data.deallocate()
        if let i = order.firstIndex(of: b) { order.remove(at: i); if next >= order.count { next = 0 } }
    }

    private func overlapping(_ r: (offset: UInt64, length: Int)) -> [UInt64] {
        guard blockSize > 0, !blocks.isEmpty, r.length > 0 else { return [] }
        let bs = UInt64(blockSize)
        let first = r.offset / bs, last = (r.offset + UInt64(r.length) - 1) / bs
        // A long range overlaps few cached blocks: then walk the cache instead of the range.
        return last - first < UInt64(blocks.count) ? Array(first...last) : blocks.keys.filter { $0 >= first && $0 <= last }
    }

    /// The cached blocks overlapping `r`, each with the bytes it shares with `r`: `count` bytes at
    /// `inBlock` in the block and at `inRange` in the range.
    private func shared(_ r: (offset: UInt64, length: Int)) -> [(entry: Entry, inBlock: Int, inRange: Int, count: Int)] {
        let bs = UInt64(blockSize)
        return overlapping(r).compactMap { b in
            guard let entry = blocks[b] else { return nil }
            let start = max(r.offset, b * bs), end = min(r.offset + UInt64(r.length), (b + 1) * bs)
            return (entry, Int(start - b * bs), Int(start - r.offset), Int(end - start))
        }
    }

    private func insert(_ block: UInt64, _ data: UnsafeRawPointer, dirty: Bool) throws {
        if var e = blocks[block] {
            e.data.copyMemory(from: data, byteCount: blockSize)
            if dirty && !e.dirty { dirtyCount += 1 }
            e.dirty = e.dirty || dirty
            blocks[block] = e
            if dirty { setFileData(block, fileDataMode) }
        } else {
            // Round-robin replacement; a dirty victim is written back first, with all the others.
            if order.count >= Self.capacity, blocks[order[next]]?.dirty == true, !writeBackUnlessFailing() {
                // The device takes no writes: a block read need not be cached, and a block
                // written is held beyond the cache's size rather than lost (see above).
                guard dirty else { return }
                if order.count >= Self.overflowLimit, !writeBackUnlessFailing(force: true) {
                    throw ThinPoolError.io(operation: "holding \(order.count) unwritten blocks in memory", path: "the volume's block cache",
                                           errno: .noSpace)
                }
            }
            // Grow while there is room, or while the victim is still dirty (write-back failing).
            if order.count < Self.capacity || blocks[order[next]]?.dirty == true {
                order.append(block)
            } else {
                if let old = blocks.removeValue(forKey: order[next]) { old.data.deallocate() }
                fileDataBlocks.remove(order[next])
                order[next] = block
                next = (next + 1) % order.count
            }
            let copy = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 64)
            copy.copyMemory(from: data, byteCount: blockSize)
            blocks[block] = Entry(data: copy, dirty: dirty)
            if dirty { dirtyCount += 1 }
            setFileData(block, dirty && fileDataMode)
        }
        // Write back early, but the block is safely cached either way: a failure here (the device
        // full) leaves the dirty blocks for the next write-back, and fails only a later insert
        // that must evict one of them.
        if dirtyCount >= Self.capacity / 2 { _ = writeBackUnlessFailing() }
    }

    /// Writes the dirty blocks in block order, one pwrite per contiguous run of one kind (file
    /// data or metadata, up to 1 MiB). A run that fails stays dirty and the others are still
    /// tried; the first error is thrown. `only`: those of these cached blocks only.
    private func writeBack(only: Set<UInt64>? = nil) throws {
        guard dirtyCount > 0 else { return }
        var failure: Error?
        let dirty = only.map { $0.filter { blocks[$0]!.dirty }.sorted() } ?? blocks.filter { $0.value.dirty }.keys.sorted()
        let maxRun = max(1, (1 << 20) / blockSize)
        if let b = runBuffer, b.bytes != maxRun * blockSize {
            b.pointer.deallocate()
            runBuffer = nil
        }
        let buffer = runBuffer?.pointer ?? UnsafeMutableRawPointer.allocate(byteCount: maxRun * blockSize, alignment: 4096)
        runBuffer = (buffer, maxRun * blockSize)
        var i = 0
        while i < dirty.count {
            let fileData = blocks[dirty[i]]!.fileData
            var n = 0
            while i + n < dirty.count, n < maxRun, dirty[i + n] == dirty[i] + UInt64(n), blocks[dirty[i + n]]!.fileData == fileData {
                buffer.advanced(by: n * blockSize).copyMemory(from: blocks[dirty[i + n]]!.data, byteCount: blockSize)
                n += 1
            }
            do {
                let run = UnsafeRawBufferPointer(start: buffer, count: n * blockSize), at = dirty[i] * UInt64(blockSize)
                if fileData { try device.writeFileData(run, at: at) } else { try device.write(run, at: at) }
                for b in dirty[i..<(i + n)] { blocks[b]!.dirty = false }
                dirtyCount -= n
            } catch {
                failure = failure ?? error
            }
            i += n
        }
        if let failure { throw failure }
        shrinkToCapacity()
    }

    /// After an overflow (write-back failing, the cache grown past `capacity`) has been written
    /// back, every block is clean: give the memory back by dropping the blocks past `capacity`.
    private func shrinkToCapacity() {
        guard dirtyCount == 0, order.count > Self.capacity else { return }
        for b in order[Self.capacity...] {
            blocks.removeValue(forKey: b)?.data.deallocate()
            fileDataBlocks.remove(b)
        }
        order.removeSubrange(Self.capacity...)
        if next >= order.count { next = 0 }
    }
}
