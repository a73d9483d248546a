import PersistentData
import SystemPackage

/// The data path: reads, writes (allocation, zeroing, copy-on-write) and discards.
extension UserspaceThinPool {
    /// What a write does to one pool block.
    private struct Step {
        var vblock: UInt64
        /// Where the bytes go.
        var target: UInt64
        /// A block allocated for this write (mapping to insert, or to release on failure).
        var allocated: Bool
        /// Copy the rest of this block first (copy-on-write of a shared or committed block).
        var copyFrom: UInt64?
        /// The byte range of the block the write covers.
        var range: Range<UInt64>
        /// Where that range starts in the caller's buffer.
        var bufferOffset: Int
    }

    @inline(__always) private func stripeIndexes(_ id: ThinDeviceID, _ blocks: ClosedRange<UInt64>) -> [Int] {
        if blocks.count >= stripes.count { return Array(0..<stripes.count) }
        var set = Set<Int>()
        for b in blocks { set.insert(Int(truncatingIfNeeded: (b &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(id)) >> 56) % stripes.count) }
        return set.sorted()
    }

    /// Writes `buffer` to thin device `id`. With `keepingReserve`, a write that needs a new data
    /// block fails with ENOSPC once no more than `reservedDataBlocks` are left (see there): file
    /// data is written that way, so that ext4's metadata can always be written back.
    public func write(_ id: ThinDeviceID, _ buffer: UnsafeRawBufferPointer, at offset: UInt64,
                      keepingReserve: Bool = false) throws {
        guard buffer.count > 0 else { return }
        try requireWritable()
        let bs = blockSize
        let first = offset / bs
        let last = (offset + UInt64(buffer.count) - 1) / bs
        try epoch.withReadLock {
            let locks = stripeIndexes(id, first...last)
            for i in locks { stripes[i].lock() }
            defer { for i in locks.reversed() { stripes[i].unlock() } }

            let steps = try plan(id, first...last, offset: offset, count: buffer.count, keepingReserve: keepingReserve)
            metaLock.withLock { unsyncedData = true }   // the next commit syncs the data file
            do {
                try execute(steps, buffer)
            } catch {
                metaLock.withLock { for s in steps where s.allocated { md.releaseDataBlock(s.target) } }
                throw error
            }
            try metaLock.withLock {
                try wrap {
                    for s in steps where s.allocated { try md.insert(id, s.vblock, dataBlock: s.target) }
                }
            }
        }
    }

    /// Decides, under the metadata lock, where each block of a write goes.
    private func plan(_ id: ThinDeviceID, _ blocks: ClosedRange<UInt64>, offset: UInt64, count: Int,
                      keepingReserve: Bool) throws -> [Step] {
        let bs = blockSize
        var steps: [Step] = []
        steps.reserveCapacity(blocks.count)
        try metaLock.withLock {
            do {
                try wrap {
                    // Metadata gone read-only (needs_check) takes no writes, not even in place
                    // into blocks already provisioned: the mappings they rely on may be the damage.
                    try md.requireWritable()
                    for vb in blocks {
                        let start = max(offset, vb * bs) - vb * bs
                        let end = min(offset + UInt64(count), (vb + 1) * bs) - vb * bs
                        let bufferOffset = Int(vb * bs + start - offset)
                        let full = start == 0 && end == bs
                        let mapping = try md.lookup(id, vb)
                        if let m = mapping, !m.shared, !options.atomicCommit || md.isDataBlockNew(m.dataBlock) {
                            steps.append(Step(vblock: vb, target: m.dataBlock, allocated: false, copyFrom: nil,
                                              range: start..<end, bufferOffset: bufferOffset))
                            continue
                        }
                        if keepingReserve && md.dataSM.nrAllocatable <= Self.reservedDataBlocks(nrDataBlocks: md.nrDataBlocks, blockSize: bs) {
                            throw ThinPoolError.noDataSpace(id)
                        }
                        let target: UInt64
                        do {
                            target = try md.allocateDataBlock()
                        } catch MetadataError.noDataSpace {
                            throw ThinPoolError.noDataSpace(id)
                        }
                        steps.append(Step(vblock: vb, target: target, allocated: true,
                                          copyFrom: full ? nil : mapping?.dataBlock,
                                          range: start..<end, bufferOffset: bufferOffset))
                    }
                }
            } catch {
                for s in steps where s.allocated { md.releaseDataBlock(s.target) }
                throw error
            }
        }
        return steps
    }

    /// Performs the data I/O of a planned write, coalescing contiguous pwrites.
    ///
    /// A partial copy-on-write is assembled in memory (the old block's bytes,
    /// then the new ones) and written with one pwrite, for blocks up to 1 MiB;
    /// larger blocks are copied in chunks.
    private func execute(_ steps: [Step], _ buffer: UnsafeRawBufferPointer) throws {
        let bs = blockSize
        let assembleInMemory = bs <= 1 << 20
        var scratch: UnsafeMutableRawBufferPointer?
        defer { scratch?.deallocate() }
        var run: (file: UInt64, buffer: Int, length: Int)?
        func flushRun() throws {
            guard let r = run else { return }
            try data.writeFully(UnsafeRawBufferPointer(rebasing: buffer[r.buffer..<r.buffer + r.length]), at: r.file, path: dataPath)
            run = nil
        }
        for s in steps {
            let base = s.target * bs
            let partial = s.range.lowerBound != 0 || s.range.upperBound != bs
            if s.allocated && partial && s.copyFrom == nil && options.blockZeroing {
                // A fresh block may hold an old device's bytes: zero what the write does not cover.
                // fallocate(ZERO_RANGE) measured cheapest: no page-cache copy of zeros, and unlike
                // PUNCH_HOLE no synchronous discard of a range that held data.
                for r in [0..<s.range.lowerBound, s.range.upperBound..<bs] where !r.isEmpty {
                    try data.zeroRange(offset: base + r.lowerBound, length: UInt64(r.count), path: dataPath)
                }
            } else if s.allocated && partial && s.copyFrom != nil {
                if assembleInMemory {
                    if scratch == nil { scratch = .allocate(byteCount: Int(bs), alignment: 4096) }
                    let block = scratch!
                    try data.readFully(into: block, at: s.copyFrom! * bs, path: dataPath)
                    UnsafeMutableRawBufferPointer(rebasing: block[Int(s.range.lowerBound)..<Int(s.range.upperBound)])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[s.bufferOffset..<s.bufferOffset + Int(s.range.count)]))
                    try flushRun()
                    try data.writeFully(UnsafeRawBufferPointer(block), at: base, path: dataPath)
                    continue
                }
                try copyData(from: s.copyFrom! * bs, to: base, ranges: [0..<s.range.lowerBound, s.range.upperBound..<bs])
            }
            let fileOffset = base + s.range.lowerBound
            let length = Int(s.range.count)
            if let r = run, r.file + UInt64(r.length) == fileOffset, r.buffer + r.length == s.bufferOffset {
                run!.length += length
            } else {
                try flushRun()
                run = (fileOffset, s.bufferOffset, length)
            }
        }
        try flushRun()
    }

    /// Copies byte ranges of one pool block into another, 1 MiB at a time.
    private func copyData(from source: UInt64, to target: UInt64, ranges: [Range<UInt64>]) throws {
        let chunk = 1 << 20
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { scratch.deallocate() }
        for r in ranges {
            var done: UInt64 = 0
            while done < UInt64(r.count) {
                let n = Int(min(UInt64(chunk), UInt64(r.count) - done))
                let part = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<n])
                try data.readFully(into: part, at: source + r.lowerBound + done, path: dataPath)
                try data.writeFully(UnsafeRawBufferPointer(part), at: target + r.lowerBound + done, path: dataPath)
                done += UInt64(n)
            }
        }
    }

    public func read(_ id: ThinDeviceID, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard buffer.count > 0 else { return }
        let bs = blockSize
        let first = offset / bs
        let last = (offset + UInt64(buffer.count) - 1) / bs
        try epoch.withReadLock {
            var targets: [UInt64?] = []
            targets.reserveCapacity(Int(last - first + 1))
            try metaLock.withLock {
                try wrap {
                    guard md.exists(id) else { throw ThinPoolError.message(.unknownDevice(id)) }
                    for vb in first...last { targets.append(try md.lookup(id, vb)?.dataBlock) }
                }
            }
            var run: (file: UInt64, buffer: Int, length: Int)?
            func flushRun() throws {
                guard let r = run else { return }
                try data.readFully(into: UnsafeMutableRawBufferPointer(rebasing: buffer[r.buffer..<r.buffer + r.length]),
                                   at: r.file, path: dataPath)
                run = nil
            }
            for (i, target) in targets.enumerated() {
                let vb = first + UInt64(i)
                let start = max(offset, vb * bs) - vb * bs
                let end = min(offset + UInt64(buffer.count), (vb + 1) * bs) - vb * bs
                let bufferOffset = Int(vb * bs + start - offset)
                let length = Int(end - start)
                guard let t = target else {
                    try flushRun()
                    UnsafeMutableRawBufferPointer(rebasing: buffer[bufferOffset..<bufferOffset + length])
                        .initializeMemory(as: UInt8.self, repeating: 0)
                    continue
                }
                let fileOffset = t * bs + start
                if let r = run, r.file + UInt64(r.length) == fileOffset, r.buffer + r.length == bufferOffset {
                    run!.length += length
                } else {
                    try flushRun()
                    run = (fileOffset, bufferOffset, length)
                }
            }
            try flushRun()
        }
    }

    /// Unmaps every whole block in the range. Partial blocks at either end are
    /// left as they are, as dm-thin does; their contents stay readable.
    public func discard(_ id: ThinDeviceID, offset: UInt64, length: UInt64) throws {
        try requireWritable()
        let bs = blockSize
        let first = (offset + bs - 1) / bs
        let end = (offset + length) / bs
        guard first < end else { return }
        try epoch.withReadLock {
            let locks = stripeIndexes(id, first...(end - 1))
            for i in locks { stripes[i].lock() }
            defer { for i in locks.reversed() { stripes[i].unlock() } }
            try metaLock.withLock {
                try wrap {
                    var mapped: [UInt64] = []
                    try md.mappings(id, in: first...(end - 1)) { vb, _ in mapped.append(vb); return true }
                    for vb in mapped { try md.remove(id, vb) }
                }
            }
        }
    }
}
