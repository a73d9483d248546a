import Foundation
import PersistentData
import ThinFS

/// The workloads of `thinfs bench`. Every pool figure is measured beside a
/// baseline in the same run: a raw file with bare pread/pwrite (`RawFile`),
/// in the same scratch directory, at the same sizes and offsets, both driven
/// through `BlockDevice` by the same loops.
///
/// The data-path phase deletes its files before the metadata phase; the
/// mapped pool of the metadata phase goes with the scratch directory. Memory
/// stays bounded: 1 MiB buffers, one offset array per workload.
final class BenchSuite {
    static let poolBlockSize: UInt64 = 64 << 10
    static let ioSize = 4096
    /// Metadata files are sparse; this is far more than 100G of mappings need (about 60 MiB).
    static let metadataSize: UInt64 = 2 << 30

    let scratch: ScratchDirectory
    let config: BenchConfiguration
    var rng: SplitMix64
    var results: [BenchResult] = []
    var notes: [String] = []
    private lazy var pretouchBuffer = IOBuffer(count: 1 << 20, rng: &rng)
    private let start = Stopwatch.clock.now
    private let progress: (String) -> Void

    init(scratch: ScratchDirectory, config: BenchConfiguration, progress: @escaping (String) -> Void) {
        self.scratch = scratch
        self.config = config
        self.rng = SplitMix64(seed: config.seed)
        self.progress = progress
    }

    /// Sizes and counts for a run; `sequential` is --size (already validated).
    static func configuration(quick: Bool, sequential: UInt64?, seed: UInt64) -> BenchConfiguration {
        let seq = sequential ?? (quick ? 64 << 20 : 1 << 30)
        let rounds = quick ? 2 : 4
        // Writes of one workload go to distinct pool blocks across all its rounds.
        let blocks = Int(seq / poolBlockSize)
        let writes = min(quick ? 256 : 3072, blocks / rounds)
        return BenchConfiguration(
            quick: quick, seed: seed, poolBlockSize: poolBlockSize, sequentialBytes: seq, sequentialRequest: 1 << 20,
            randomReadsPerRound: quick ? 20_000 : 100_000, randomWritesPerRound: writes, rounds: rounds,
            snapshotSmallBytes: quick ? 16 << 20 : 1 << 30, snapshotLargeBytes: quick ? 1 << 30 : 100 << 30,
            deleteBytes: quick ? 256 << 20 : 10 << 30, latencyRuns: quick ? 5 : 15,
            crcHardwareBytes: quick ? 256 << 20 : 2 << 30, crcSoftwareBytes: quick ? 64 << 20 : 512 << 20)
    }

    /// Disk space the largest phase needs, with a margin. Freed pool blocks are
    /// not punched out of the data file, so every copy counts.
    static func diskNeeded(_ c: BenchConfiguration) -> UInt64 {
        let n = UInt64(c.randomWritesPerRound * c.rounds)
        let bs = c.poolBlockSize
        let dataPath = 7 * c.sequentialBytes + n * bs            // 3 rounds raw + pool, pre-touch, atomic-commit copies
            + 2 * n * (4096 + bs)                                 // allocation, raw + pool
            + n * bs + UInt64(c.latencyRuns) * bs                 // copy-on-write, commit latency
        let mapped = (c.snapshotSmallBytes + c.snapshotLargeBytes + c.deleteBytes) / bs * 4096
        return max(dataPath, mapped) / 10 * 11 + (256 << 20)
    }

    func run() throws -> BenchReport {
        notes.append("nothing is dropped from the page cache: reads are served from memory and writes are buffered, " +
                     "except in rows that say commit or fdatasync")
        notes.append("before each timed write run, as much data as it will newly put in the page cache is written to a " +
                     "scratch file and deleted (untimed), so that both sides get memory the hypervisor has backed")
        try runDataPath()
        try runMetadata()
        runChecksum()
        let machine = MachineInfo.probe(scratch: scratch.path, crc32cHardware: CRC32C.isHardwareAccelerated)
        return BenchReport(machine: machine, configuration: config, results: results, notes: notes,
                           totalSeconds: (Stopwatch.clock.now - start).seconds)
    }

    func step(_ what: String) {
        progress(String(format: "[%6.1fs] ", (Stopwatch.clock.now - start).seconds) + what)
    }

    // MARK: Recording

    /// Records a figure; `ratio` is thinfs / baseline, and a goal is judged on the spot.
    func record(_ section: String, _ id: String, _ name: String, unit: BenchResult.Unit, thinfs: Double,
                baseline: Double? = nil, baselineName: String? = nil, goal: Goal? = nil, note: String? = nil) {
        let ratio = baseline.flatMap { $0 > 0 ? thinfs / $0 : nil }
        results.append(BenchResult(section: section, id: id, name: name, unit: unit, thinfs: thinfs, baseline: baseline,
                                   baselineName: baselineName, ratio: ratio, goal: goal?.text(unit),
                                   pass: goal?.met(value: thinfs, ratio: ratio), note: note))
    }

    static func mibPerSecond(_ bytes: UInt64, _ seconds: Double) -> Double { Double(bytes) / 1_048_576 / seconds }
    static func opsPerSecond(_ ops: Int, _ seconds: Double) -> Double { Double(ops) / seconds }

    // MARK: Pairing

    /// Waits for all dirty data to reach the disk (sync(2)), so that a timed run
    /// does not pay for the writeback of the one before it.
    func settle() { sync() }

    /// Writes `bytes` into a new file and deletes it at once, untimed, so that
    /// the timed run after it gets page-cache memory the hypervisor has just
    /// backed. On a VM whose balloon reports free memory back to the host (it
    /// does so for pages free for about 2 s), the first touch of such memory
    /// costs more than the file system: dd into a new file ran between 300
    /// MB/s and 5 GB/s here depending on it, and would be charged to whichever
    /// side came after a pause.
    func pretouch(_ bytes: UInt64) throws {
        guard bytes > 0 else { return }
        let name = "pretouch.img"
        let file = try RawFile.create(scratch.file(name), size: bytes)
        defer { scratch.removeFile(name) }
        _ = try sequentialWrite(file, bytes: bytes, buffer: pretouchBuffer)
    }

    /// Times the raw side and the thin side once each, in an order that
    /// alternates with `round`, so that neither side always goes first. Before
    /// each: settle, then pre-touch `fresh` bytes of page cache (what the
    /// timed writes will newly fill; 0 for reads).
    func paired(_ round: Int, fresh: UInt64 = 0, raw: () throws -> Double, thin: () throws -> Double) throws -> (raw: Double, thin: Double) {
        func prepared(_ side: () throws -> Double) throws -> Double {
            settle()
            try pretouch(fresh)
            return try side()
        }
        if round % 2 == 0 {
            let r = try prepared(raw)
            return (r, try prepared(thin))
        }
        let t = try prepared(thin)
        return (try prepared(raw), t)
    }

    // MARK: I/O loops, the same for a thin device and the raw file

    /// Writes `bytes` from offset 0 in `buffer`-sized requests; returns seconds.
    func sequentialWrite(_ dev: BlockDevice, bytes: UInt64, buffer: IOBuffer) throws -> Double {
        let request = UInt64(buffer.bytes.count)
        return try Stopwatch.seconds {
            var offset: UInt64 = 0
            while offset < bytes {
                let n = Int(min(request, bytes - offset))
                try dev.write(buffer.prefix(n), at: offset)
                offset += UInt64(n)
            }
        }
    }

    func sequentialRead(_ dev: BlockDevice, bytes: UInt64, buffer: IOBuffer) throws -> Double {
        let request = UInt64(buffer.bytes.count)
        return try Stopwatch.seconds {
            var offset: UInt64 = 0
            while offset < bytes {
                let n = Int(min(request, bytes - offset))
                try dev.read(into: buffer.mutablePrefix(n), at: offset)
                offset += UInt64(n)
            }
        }
    }

    /// One `length`-byte read or write at each offset, in order; returns seconds.
    func randomIO<C: Collection>(_ dev: BlockDevice, _ offsets: C, length: Int, buffer: IOBuffer,
                                 write: Bool) throws -> Double where C.Element == UInt64 {
        if write {
            let b = buffer.prefix(length)
            return try Stopwatch.seconds { for o in offsets { try dev.write(b, at: o) } }
        }
        let b = buffer.mutablePrefix(length)
        return try Stopwatch.seconds { for o in offsets { try dev.read(into: b, at: o) } }
    }

    // MARK: Offsets

    /// `count` 4K-aligned offsets, uniform over `bytes`.
    func uniformOffsets(count: Int, within bytes: UInt64) -> [UInt64] {
        let slots = bytes / UInt64(Self.ioSize)
        return (0..<count).map { _ in rng.next(upperBound: slots) * UInt64(Self.ioSize) }
    }

    /// `count` offsets in distinct pool blocks among the first `blocks`, in
    /// random order; each at a random 4K slot of its block, or at the block's
    /// start when `atBlockStart` (partial Fisher-Yates over the block numbers).
    func distinctBlockOffsets(count: Int, blocks: UInt64, firstBlock: UInt64 = 0, atBlockStart: Bool = false) -> [UInt64] {
        precondition(UInt64(count) <= blocks, "\(count) distinct blocks wanted among \(blocks)")
        var numbers = Array(0..<blocks)
        let bs = Self.poolBlockSize
        let slots = bs / UInt64(Self.ioSize)
        var offsets: [UInt64] = []
        offsets.reserveCapacity(count)
        for i in 0..<count {
            let j = i + Int(rng.next(upperBound: UInt64(numbers.count - i)))
            numbers.swapAt(i, j)
            let slot = atBlockStart ? 0 : rng.next(upperBound: slots) * UInt64(Self.ioSize)
            offsets.append((firstBlock + numbers[i]) * bs + slot)
        }
        return offsets
    }
}
