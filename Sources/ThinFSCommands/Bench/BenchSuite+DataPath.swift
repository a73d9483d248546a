import Foundation
import PersistentData
import ThinFS

/// Data-path workloads: thin devices against raw files, same sizes and offsets.
///
/// Thin devices 1, 4 and 5 are written sequentially (one per round) and
/// committed; device 2 then takes first writes into fresh blocks, before any
/// block has been freed, so that every block it gets was never written. Device
/// 1 is then read and written at random with `atomicCommit` on and (after
/// reopening the pool) off, and finally snapshotted for the copy-on-write
/// figures. Every figure is the median of alternating rounds (`paired`).
extension BenchSuite {
    private static let section = "Data path (thin device vs raw file, 4K = 4 KiB requests)"
    private static let rawName = "raw file, pread/pwrite at the same offsets"
    private static let origin: ThinDeviceID = 1
    private static let fresh: ThinDeviceID = 2
    private static let snapshot: ThinDeviceID = 3
    /// Devices written by the later sequential rounds.
    private static let sequentialDevices: [ThinDeviceID] = [origin, 4, 5]

    private var dataFile: String { scratch.file("pool-data") }
    private var metadataFile: String { scratch.file("pool-metadata") }
    private var totalWrites: Int { config.randomWritesPerRound * config.rounds }

    func runDataPath() throws {
        let bs = Self.poolBlockSize
        let s = config.sequentialBytes
        let n = UInt64(totalWrites)
        // Sparse, so generous: the sequential devices, every copy and every fresh block fit without reuse.
        let dataSize = UInt64(Self.sequentialDevices.count) * s + 4 * n * bs + (64 << 20)
        let raw = try RawFile.create(scratch.file("raw-0.img"), size: s)
        do {
            let pool = try UserspaceThinPool.create(dataPath: dataFile, metadataPath: metadataFile, dataSize: dataSize,
                                                    metadataSize: Self.metadataSize, blockSize: bs)
            for id in Self.sequentialDevices { try pool.message(.createThin(id)) }
            let dev = try pool.openDevice(Self.origin, size: s)
            try sequential(pool, dev, raw)
            try allocation(pool)
            try random(pool, dev, raw, atomic: true)
        }
        do {
            let pool = try UserspaceThinPool.open(dataPath: dataFile, metadataPath: metadataFile,
                                                  options: .init(atomicCommit: false))
            try random(pool, try pool.openDevice(Self.origin, size: s), raw, atomic: false)
        }
        do {
            let pool = try UserspaceThinPool.open(dataPath: dataFile, metadataPath: metadataFile)
            try copyOnWrite(pool, raw)
            try commitLatency(pool, raw)
        }
        step("removing the data-path files (not timed)")
        for i in Self.sequentialDevices.indices { scratch.removeFile("raw-\(i).img") }
        for f in ["raw-fresh.img", "pool-data", "pool-metadata"] { scratch.removeFile(f) }
        settle()
    }

    /// Per-round times of both sides; figures are medians of per-round rates.
    private struct Rounds {
        var raw: [Double] = []
        var thin: [Double] = []

        mutating func add(_ t: (raw: Double, thin: Double)) {
            raw.append(t.raw)
            thin.append(t.thin)
        }

        func mibPerSecond(bytesPerRound: UInt64) -> (thin: Double, raw: Double) {
            (Stats.median(thin.map { BenchSuite.mibPerSecond(bytesPerRound, $0) }),
             Stats.median(raw.map { BenchSuite.mibPerSecond(bytesPerRound, $0) }))
        }

        func opsPerSecond(opsPerRound: Int) -> (thin: Double, raw: Double) {
            (Stats.median(thin.map { BenchSuite.opsPerSecond(opsPerRound, $0) }),
             Stats.median(raw.map { BenchSuite.opsPerSecond(opsPerRound, $0) }))
        }
    }

    // MARK: Sequential

    /// Rounds of writing a fresh device and a fresh file, each followed by its
    /// commit or fdatasync; then reads of device 1 and the first file.
    private func sequential(_ pool: UserspaceThinPool, _ dev: BlockDevice, _ raw: BlockDevice) throws {
        let bytes = config.sequentialBytes
        let size = ByteSize.format(bytes)
        let buffer = IOBuffer(count: config.sequentialRequest, rng: &rng)
        let request = ByteSize.format(UInt64(config.sequentialRequest))
        let rounds = Self.sequentialDevices.count

        step("sequential write \(size) x \(rounds): raw file and thin device, alternating")
        var writes = Rounds(), syncs = Rounds()
        for (round, id) in Self.sequentialDevices.enumerated() {
            let t: BlockDevice = round == 0 ? dev : try pool.openDevice(id, size: bytes)
            let r: BlockDevice = round == 0 ? raw : try RawFile.create(scratch.file("raw-\(round).img"), size: bytes)
            var sync = (raw: 0.0, thin: 0.0)
            writes.add(try paired(round, fresh: bytes, raw: {
                let w = try sequentialWrite(r, bytes: bytes, buffer: buffer)
                sync.raw = try Stopwatch.seconds { try r.flush() }
                return w
            }, thin: {
                let w = try sequentialWrite(t, bytes: bytes, buffer: buffer)
                sync.thin = try Stopwatch.seconds { try t.flush() }
                return w
            }))
            syncs.add(sync)
        }
        let w = writes.mibPerSecond(bytesPerRound: bytes)
        record(Self.section, "seq_write", "sequential write \(size), \(request) requests", unit: .mibPerSecond,
               thinfs: w.thin, baseline: w.raw, baselineName: Self.rawName, goal: .ratioAtLeast(0.8),
               note: "buffered, median of \(rounds) rounds, each into a new device and file; " +
                     "every request maps \(config.sequentialRequest / Int(Self.poolBlockSize)) fresh pool blocks")
        record(Self.section, "seq_write_sync", "commit after it vs fdatasync of \(size)", unit: .milliseconds,
               thinfs: Stats.median(syncs.thin) * 1000, baseline: Stats.median(syncs.raw) * 1000,
               baselineName: "fdatasync of the raw file",
               note: "median of \(rounds); the commit fdatasyncs the data file, writes the metadata, then the superblock")

        step("sequential read \(size) x \(config.rounds), alternating")
        var reads = Rounds()
        for round in 0..<config.rounds {
            reads.add(try paired(round, raw: { try sequentialRead(raw, bytes: bytes, buffer: buffer) },
                                 thin: { try sequentialRead(dev, bytes: bytes, buffer: buffer) }))
        }
        let r = reads.mibPerSecond(bytesPerRound: bytes)
        record(Self.section, "seq_read", "sequential read \(size), \(request) requests", unit: .mibPerSecond,
               thinfs: r.thin, baseline: r.raw, baselineName: Self.rawName, goal: .ratioAtLeast(0.8),
               note: "from the page cache, median of \(config.rounds) rounds")
    }

    // MARK: Random, on mapped unshared blocks

    /// Random 4K reads over the whole device, then 4K writes into distinct
    /// committed blocks; every round ends with a commit (and an fdatasync of the
    /// raw file), outside the timing, so each round starts from committed blocks.
    private func random(_ pool: UserspaceThinPool, _ dev: BlockDevice, _ raw: BlockDevice, atomic: Bool) throws {
        let mode = atomic ? "atomicCommit=true" : "atomicCommit=false"
        let bytes = config.sequentialBytes
        let buffer = IOBuffer(count: Self.ioSize, rng: &rng)

        step("random 4K reads, \(mode)")
        let readOffsets = uniformOffsets(count: config.randomReadsPerRound, within: bytes)
        var reads = Rounds()
        for round in 0..<config.rounds {
            reads.add(try paired(round, raw: { try randomIO(raw, readOffsets, length: Self.ioSize, buffer: buffer, write: false) },
                                 thin: { try randomIO(dev, readOffsets, length: Self.ioSize, buffer: buffer, write: false) }))
        }
        let r = reads.opsPerSecond(opsPerRound: config.randomReadsPerRound)
        record(Self.section, atomic ? "rand_read_atomic" : "rand_read_inplace", "random 4K read, mapped, \(mode)",
               unit: .opsPerSecond, thinfs: r.thin, baseline: r.raw, baselineName: Self.rawName, goal: .ratioAtLeast(0.5),
               note: "uniform over \(ByteSize.format(bytes)), from the page cache; median of \(config.rounds) rounds")

        step("random 4K writes into distinct committed blocks, \(mode)")
        let offsets = distinctBlockOffsets(count: totalWrites, blocks: bytes / Self.poolBlockSize)
        let w = try writeRounds(pool, dev, raw, offsets, length: Self.ioSize, buffer: buffer)
        let note = atomic
            ? "each write is the first since the last commit into its block, so the pool copies the other 60K of the block first (worst case)"
            : "in place, as the kernel does"
        record(Self.section, atomic ? "rand_write_atomic" : "rand_write_inplace", "random 4K write, mapped unshared, \(mode)",
               unit: .opsPerSecond, thinfs: w.thin, baseline: w.raw, baselineName: Self.rawName, goal: .ratioAtLeast(0.5), note: note)
    }

    /// Writes at `offsets` in `config.rounds` alternating rounds of
    /// `randomWritesPerRound`. A round ends with a commit, or an fdatasync of the
    /// raw file, outside the timing. Each write may fill a fresh pool block (a
    /// copy or an allocation), so as much page cache is pre-touched.
    private func writeRounds(_ pool: UserspaceThinPool, _ dev: BlockDevice, _ raw: BlockDevice, _ offsets: [UInt64],
                             length: Int, buffer: IOBuffer) throws -> (thin: Double, raw: Double) {
        let per = config.randomWritesPerRound
        var rounds = Rounds()
        for round in 0..<config.rounds {
            let chunk = offsets[round * per..<(round + 1) * per]
            rounds.add(try paired(round, fresh: UInt64(per) * Self.poolBlockSize, raw: {
                let t = try randomIO(raw, chunk, length: length, buffer: buffer, write: true)
                try raw.flush()
                return t
            }, thin: {
                let t = try randomIO(dev, chunk, length: length, buffer: buffer, write: true)
                try pool.commit()
                return t
            }))
        }
        return rounds.opsPerSecond(opsPerRound: per)
    }

    // MARK: Fresh blocks

    /// First writes into unmapped blocks of a new device: 4K at the start of a
    /// block (the pool zeroes the other 60K by punching a hole), and whole 64K
    /// blocks (nothing to zero), against the same writes into a new sparse file.
    private func allocation(_ pool: UserspaceThinPool) throws {
        let n = totalWrites
        let bs = Self.poolBlockSize
        try pool.message(.createThin(Self.fresh))
        let dev = try pool.openDevice(Self.fresh, size: 2 * UInt64(n) * bs)
        let raw = try RawFile.create(scratch.file("raw-fresh.img"), size: 2 * UInt64(n) * bs)
        let buffer = IOBuffer(count: Int(bs), rng: &rng)

        step("first writes into fresh blocks: \(n) x 4K, then \(n) x 64K, in alternating rounds")
        let partial = distinctBlockOffsets(count: n, blocks: UInt64(n), atBlockStart: true)
        let whole = distinctBlockOffsets(count: n, blocks: UInt64(n), firstBlock: UInt64(n), atBlockStart: true)
        let p = try writeRounds(pool, dev, raw, partial, length: Self.ioSize, buffer: buffer)
        let w = try writeRounds(pool, dev, raw, whole, length: Int(bs), buffer: buffer)
        record(Self.section, "alloc_4k", "first 4K write into a fresh block (allocates)", unit: .opsPerSecond,
               thinfs: p.thin, baseline: p.raw, baselineName: "raw: 4K pwrite into a new sparse file",
               note: "blockZeroing=true: the other 60K is punched out")
        record(Self.section, "alloc_64k", "first 64K write of a whole fresh block", unit: .opsPerSecond,
               thinfs: w.thin, baseline: w.raw, baselineName: "raw: 64K pwrite into a new sparse file")
    }

    // MARK: Shared blocks

    /// create_snap of the fully mapped device, then 4K writes into distinct
    /// blocks of the origin: each copies its shared 64K block first.
    private func copyOnWrite(_ pool: UserspaceThinPool, _ raw: BlockDevice) throws {
        try pool.message(.createSnap(Self.snapshot, origin: Self.origin))
        let dev = try pool.openDevice(Self.origin, size: config.sequentialBytes)
        let buffer = IOBuffer(count: Self.ioSize, rng: &rng)

        step("copy-on-write 4K writes into shared blocks")
        let offsets = distinctBlockOffsets(count: totalWrites, blocks: config.sequentialBytes / Self.poolBlockSize)
        let w = try writeRounds(pool, dev, raw, offsets, length: Self.ioSize, buffer: buffer)
        record(Self.section, "cow_write", "4K write into a block shared with a snapshot", unit: .opsPerSecond,
               thinfs: w.thin, baseline: w.raw, baselineName: Self.rawName,
               note: "copy-on-write: 60K copied, 4K written, mapping inserted")
    }

    // MARK: Commit

    /// Commit after one 4K write, and with nothing to commit, against an
    /// fdatasync of the raw file after the same write, and with nothing dirty.
    private func commitLatency(_ pool: UserspaceThinPool, _ raw: BlockDevice) throws {
        let dev = try pool.openDevice(Self.origin, size: config.sequentialBytes)
        let buffer = IOBuffer(count: Self.ioSize, rng: &rng)
        let runs = config.latencyRuns
        step("commit latency x \(runs)")
        var thinSmall: [Double] = [], rawSmall: [Double] = [], thinEmpty: [Double] = [], rawEmpty: [Double] = []
        for offset in uniformOffsets(count: runs, within: config.sequentialBytes) {
            try dev.write(buffer.readOnly, at: offset)
            thinSmall.append(try Stopwatch.seconds { try pool.commit() })
            try raw.write(buffer.readOnly, at: offset)
            rawSmall.append(try Stopwatch.seconds { try raw.flush() })
            thinEmpty.append(try Stopwatch.seconds { try pool.commit() })
            rawEmpty.append(try Stopwatch.seconds { try raw.flush() })
        }
        record(Self.section, "commit_small", "commit after one 4K write (median of \(runs))", unit: .milliseconds,
               thinfs: Stats.median(thinSmall) * 1000, baseline: Stats.median(rawSmall) * 1000,
               baselineName: "fdatasync of the raw file after a 4K pwrite",
               note: "3 fdatasyncs: data file, metadata blocks, superblock")
        record(Self.section, "commit_empty", "commit with nothing to commit (median of \(runs))", unit: .milliseconds,
               thinfs: Stats.median(thinEmpty) * 1000, baseline: Stats.median(rawEmpty) * 1000,
               baselineName: "fdatasync of the raw file with nothing dirty")
    }
}
