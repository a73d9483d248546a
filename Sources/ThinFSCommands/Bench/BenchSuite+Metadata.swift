import Foundation
import PersistentData
import ThinFS

/// Metadata workloads: create_snap and delete on fully mapped devices.
///
/// Mapping 100G through the data path would write 100G. Instead the pool runs
/// with blockZeroing=false and each 64K block gets one 4K write at its start:
/// every block is mapped (one btree entry, one data-block reference, exactly
/// what a full write leaves in the metadata), while the data file stays sparse
/// with 1/16 of the mapped size on disk.
extension BenchSuite {
    private static let section = "Metadata (pool with blockZeroing=false; every 64K block mapped by a 4K write at its start)"
    private static let small: ThinDeviceID = 10
    private static let large: ThinDeviceID = 11
    private static let doomed: ThinDeviceID = 12
    private static let snapshot: ThinDeviceID = 20
    /// Commit while filling every 8G mapped (512M of data), to bound dirty memory.
    private static let commitEvery: UInt64 = 131_072

    func runMetadata() throws {
        let c = config
        let bs = Self.poolBlockSize
        let small = ByteSize.format(c.snapshotSmallBytes), large = ByteSize.format(c.snapshotLargeBytes)
        let pool = try UserspaceThinPool.create(
            dataPath: scratch.file("mapped-data"), metadataPath: scratch.file("mapped-metadata"),
            dataSize: c.snapshotSmallBytes + c.snapshotLargeBytes + c.deleteBytes + (64 << 20),
            metadataSize: Self.metadataSize, blockSize: bs, options: .init(blockZeroing: false))
        for id in [Self.small, Self.large, Self.doomed] { try pool.message(.createThin(id)) }

        step("mapping every block of a \(small) device")
        _ = try fill(pool, Self.small, bytes: c.snapshotSmallBytes)
        step("mapping every block of a \(large) device")
        let fillSeconds = try fill(pool, Self.large, bytes: c.snapshotLargeBytes)
        record(Self.section, "map_fill", "map a fresh block with a 4K write (filling \(large))", unit: .opsPerSecond,
               thinfs: Self.opsPerSecond(Int(c.snapshotLargeBytes / bs), fillSeconds),
               note: "includes a commit every \(ByteSize.format(Self.commitEvery * bs)) mapped, and the first touch of " +
                     "the page cache each 4K write fills (not pre-touched)")

        let runs = c.latencyRuns
        settle()
        step("create_snap x \(runs) on the \(small) and \(large) devices, interleaved")
        var message: [ThinDeviceID: [Double]] = [:], change: [ThinDeviceID: [Double]] = [:], commit: [ThinDeviceID: [Double]] = [:]
        for _ in 0..<runs {
            for origin in [Self.small, Self.large] {
                message[origin, default: []].append(try Stopwatch.seconds {
                    try pool.message(.createSnap(Self.snapshot, origin: origin))
                })
                try pool.message(.delete(Self.snapshot))
                // The same message in its two parts: the metadata change, then the commit.
                change[origin, default: []].append(try Stopwatch.seconds {
                    try pool.withMetadata { try $0.createSnap(Self.snapshot, origin: origin) }
                })
                commit[origin, default: []].append(try Stopwatch.seconds { try pool.commit() })
                try pool.message(.delete(Self.snapshot))
            }
        }
        func ms(_ samples: [ThinDeviceID: [Double]], _ id: ThinDeviceID) -> Double { Stats.median(samples[id]!) * 1000 }
        record(Self.section, "snap_small", "create_snap, \(small) mapped (median of \(runs))", unit: .milliseconds,
               thinfs: ms(message, Self.small), goal: .below(1), note: "the message, including its commit")
        record(Self.section, "snap_large", "create_snap, \(large) mapped (median of \(runs))", unit: .milliseconds,
               thinfs: ms(message, Self.large), goal: .below(1), note: "the message, including its commit")
        record(Self.section, "snap_size_independence", "create_snap, \(large) vs \(small) mapped", unit: .milliseconds,
               thinfs: ms(message, Self.large), baseline: ms(message, Self.small),
               baselineName: "create_snap of the \(small) device", goal: .ratioAtMost(2),
               note: "size-independent: \(c.snapshotLargeBytes / c.snapshotSmallBytes) times the mappings, at most twice the time")
        record(Self.section, "snap_change", "  of which metadata change, \(large) vs \(small)", unit: .milliseconds,
               thinfs: ms(change, Self.large), baseline: ms(change, Self.small), baselineName: "the \(small) device")
        record(Self.section, "snap_commit", "  of which commit, \(large) vs \(small)", unit: .milliseconds,
               thinfs: ms(commit, Self.large), baseline: ms(commit, Self.small), baselineName: "the \(small) device")

        let doomed = ByteSize.format(c.deleteBytes)
        step("mapping every block of a \(doomed) device, then deleting it")
        _ = try fill(pool, Self.doomed, bytes: c.deleteBytes)
        settle()
        let drop = try Stopwatch.seconds { try pool.withMetadata { try $0.delete(Self.doomed) } }
        let dropCommit = try Stopwatch.seconds { try pool.commit() }
        record(Self.section, "delete", "delete, \(doomed) mapped (\(c.deleteBytes / bs) blocks)", unit: .milliseconds,
               thinfs: (drop + dropCommit) * 1000,
               note: String(format: "metadata change %.1f ms (walks the mapping tree, drops every data-block reference) + commit %.1f ms; " +
                            "one run, metadata in the block cache", drop * 1000, dropCommit * 1000))
        // The mapped data file has one file-system extent per mapped block; it
        // goes with the scratch directory, after the report is printed.
    }

    /// Maps every block of device `id` up to `bytes` with one 4K write at each
    /// block's start, and commits; returns seconds.
    private func fill(_ pool: UserspaceThinPool, _ id: ThinDeviceID, bytes: UInt64) throws -> Double {
        let dev = try pool.openDevice(id, size: bytes)
        let buffer = IOBuffer(count: Self.ioSize, rng: &rng)
        let bs = Self.poolBlockSize
        let blocks = bytes / bs
        let quarter = max(blocks / 4, 1)
        return try Stopwatch.seconds {
            for vb in 0..<blocks {
                try dev.write(buffer.readOnly, at: vb * bs)
                if (vb + 1) % Self.commitEvery == 0 { try pool.commit() }
                if blocks >= 1 << 20, (vb + 1) % quarter == 0, vb + 1 < blocks {
                    step("  \(ByteSize.format((vb + 1) * bs)) mapped")
                }
            }
            try pool.commit()
        }
    }
}
