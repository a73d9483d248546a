import Foundation
import Logging
import PersistentData
import Synchronization
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
@testable import ThinFSCommands

// Host tests of the kernel backend: status and table text, KernelThinPool's
// sequences against the in-memory FakeDeviceMapper, libdevmapper's log route
// on a host without device-mapper, and `thinfs setup-lvm` against a scripted
// LVMSystem. The real-kernel side runs in the VM (scripts/vm/tests/kernel-pool-*).

@Suite("DeviceMapper: kernel status lines")
struct DeviceMapperStatusTests {
    @Test(arguments: [
        // A fresh LVM pool (lvconvert --thinpool, 512K chunks): discards passed down, queueing when full.
        ("0 141/524288 0/1638400 - rw discard_passdown queue_if_no_space - 1024", UInt64(0), PoolStatus.Mode.rw, false, false, UInt64?.none),
        // Docker's loop-lvm pool after some layers, error_if_no_space, no passdown.
        ("12 260/4096 2/16384 - rw no_discard_passdown error_if_no_space - 1024", 12, .rw, true, false, nil),
        // Every data block used: the kernel switches to out_of_data_space.
        ("5 300/4096 16384/16384 - out_of_data_space discard_passdown queue_if_no_space - 1024", 5, .outOfDataSpace, false, false, nil),
        // Metadata trouble: read-only, needs_check set, a metadata snapshot held at block 1536.
        ("5 300/4096 100/16384 1536 ro discard_passdown error_if_no_space needs_check 1024", 5, .ro, true, true, 1536),
        // ignore_discard, and a small metadata device (watermark = a quarter of it).
        ("3 20/64 7/100 - rw ignore_discard queue_if_no_space - 16", 3, .rw, false, false, nil),
    ])
    func poolLine(line: String, txn: UInt64, mode: PoolStatus.Mode, errorIfNoSpace: Bool, needsCheck: Bool, held: UInt64?) throws {
        let s = try PoolStatus(kernelLine: line, dataBlockSize: 512 << 10)
        #expect(s.transactionID == txn)
        #expect(s.mode == mode)
        #expect(s.errorIfNoSpace == errorIfNoSpace)
        #expect(s.needsCheck == needsCheck)
        #expect(s.heldMetadataRoot == held)
        #expect(s.dataBlockSize == 512 << 10)
        // Printing it back gives the kernel's line.
        #expect(s.line == line)
    }

    @Test func poolLineFieldsInOrder() throws {
        let s = try PoolStatus(kernelLine: "7 141/524288 33/1638400 - rw discard_passdown queue_if_no_space - 1024 ", dataBlockSize: 65536)
        #expect(s.usedMetadataBlocks == 141)
        #expect(s.totalMetadataBlocks == 524288)
        #expect(s.usedDataBlocks == 33)
        #expect(s.totalDataBlocks == 1638400)
        #expect(s.discard == "discard_passdown")
        #expect(s.metadataLowWatermark == 1024)
    }

    @Test func poolLineFromKernelsBefore4_19HasNoWatermark() throws {
        let s = try PoolStatus(kernelLine: "0 10/4096 0/100 - rw discard_passdown queue_if_no_space -", dataBlockSize: 65536)
        #expect(s.metadataLowWatermark == 0)
        #expect(s.mode == .rw)
    }

    @Test func failedPool() throws {
        let s = try PoolStatus(kernelLine: "Fail", dataBlockSize: 65536)
        #expect(s.mode == .fail)
        #expect(s.line == "Fail")
    }

    @Test func errorStatusIsAnError() {
        #expect(throws: KernelStatusError.statusError("thin-pool")) { try PoolStatus(kernelLine: "Error", dataBlockSize: 65536) }
    }

    @Test(arguments: [
        "",                                                                      // nothing
        "0 1/2",                                                                 // truncated
        "x 1/2 3/4 - rw discard_passdown queue_if_no_space - 1",                 // transaction id not a number
        "0 1-2 3/4 - rw discard_passdown queue_if_no_space - 1",                 // not used/total
        "0 1/2 3/4 - writable discard_passdown queue_if_no_space - 1",           // unknown mode
        "0 1/2 3/4 - Fail discard_passdown queue_if_no_space - 1",               // Fail only stands alone
        "0 1/2 3/4 - rw discard queue_if_no_space - 1",                          // unknown discard mode
        "0 1/2 3/4 - rw discard_passdown maybe_if_no_space - 1",                 // unknown no-space policy
        "0 1/2 3/4 - rw discard_passdown queue_if_no_space checked 1",           // unknown needs_check word
        "0 1/2 3/4 - rw discard_passdown queue_if_no_space - 1 extra",           // too many fields
    ])
    func malformedPoolLines(line: String) {
        #expect(throws: KernelStatusError.self) { try PoolStatus(kernelLine: line, dataBlockSize: 65536) }
    }

    @Test func thinLines() throws {
        // 2 MiB mapped, highest mapped sector 8191 (blocks 0..63 of 64K).
        #expect(try KernelThinStatus(kernelLine: "4096 8191") == .ok(ThinDeviceStatus(mappedSectors: 4096, highestMappedSector: 8191)))
        // Nothing mapped yet.
        #expect(try KernelThinStatus(kernelLine: "0 -") == .ok(ThinDeviceStatus(mappedSectors: 0, highestMappedSector: nil)))
        #expect(try KernelThinStatus(kernelLine: "Fail") == .fail)
        #expect(try KernelThinStatus(kernelLine: "-") == .unavailable)
        #expect(throws: KernelStatusError.statusError("thin")) { try KernelThinStatus(kernelLine: "Error") }
        for bad in ["", "12", "a b", "1 2 3", "1 x"] {
            #expect(throws: KernelStatusError.self) { try KernelThinStatus(kernelLine: bad) }
        }
    }
}

@Suite("DeviceMapper: tables")
struct DeviceMapperTableTests {
    @Test func thinTable() {
        let t = ThinTable(poolDevice: "/dev/mapper/docker-thinpool", id: 7, sectors: 20_971_520)
        #expect(t.line == "0 20971520 thin /dev/mapper/docker-thinpool 7")
        #expect(ThinTable(poolDevice: "253:2", id: 1, sectors: 8, externalOrigin: "253:5").line == "0 8 thin 253:2 1 253:5")
    }

    @Test func poolTableRoundTrip() throws {
        let t = ThinPoolTable(metadataDevice: "7:1", dataDevice: "7:0", dataSectors: 209_715_200, blockSectors: 128,
                              lowWaterMark: 32768, features: ["skip_block_zeroing"])
        #expect(t.line == "0 209715200 thin-pool 7:1 7:0 128 32768 1 skip_block_zeroing")
        #expect(try ThinPoolTable(t.target) == t)
        // What LVM loads: no features.
        let lvm = DeviceMapperTarget(length: 1_992_294_400, type: "thin-pool", params: "253:1 253:2 1024 0")
        #expect(try ThinPoolTable(lvm).blockSectors == 1024)
        #expect(try ThinPoolTable(lvm).features == [])
        #expect(throws: KernelStatusError.self) { try ThinPoolTable(DeviceMapperTarget(length: 8, type: "linear", params: "7:0 0")) }
        #expect(throws: KernelStatusError.self) { try ThinPoolTable(DeviceMapperTarget(length: 8, type: "thin-pool", params: "7:1 7:0 128 0 2 skip_block_zeroing")) }
    }

    @Test func loopPoolTableUsesDockersDefaults() {
        let c = LoopThinPool.Configuration(dataFile: "/d", metadataFile: "/m")
        let t = c.table(metadataDevice: "/dev/loop1", dataDevice: "/dev/loop0")
        // 100 GiB of 64 KiB blocks; low water mark 32768 blocks; skip_block_zeroing as loop-lvm had.
        #expect(t.line == "0 209715200 thin-pool /dev/loop1 /dev/loop0 128 32768 1 skip_block_zeroing")
        let small = LoopThinPool.Configuration(dataFile: "/d", metadataFile: "/m", dataSize: 64 << 20, features: [])
        // A small pool: the low water mark is a tenth of its 1024 blocks.
        #expect(small.table(metadataDevice: "a", dataDevice: "b").line == "0 131072 thin-pool a b 128 102")
    }

    @Test func thinDeviceSizesRoundUpToSectors() throws {
        let (_, pool) = try makeFakePool()
        #expect(pool.thinTable(3, size: 10 << 30).line == "0 20971520 thin /dev/mapper/pool 3")
        #expect(pool.thinTable(3, size: 1000).sectors == 2)
    }

    @Test func errorsNameOperationAndDevice() {
        let e = DeviceMapperError(.remove, device: "thinfs-4", errno: .resourceBusy)
        #expect(e.description.contains("remove 'thinfs-4'"))
        #expect(e.description.contains("still open"))
        #expect(DeviceMapperError(.message, device: "pool", errno: .invalidArgument, detail: "create_thin x").description
            .contains("(create_thin x)"))
    }
}

/// Expects `body` to throw `expected` (ThinPoolError is not Equatable; its description names everything).
func expectPoolError(_ expected: ThinPoolError, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    let e = #expect(throws: ThinPoolError.self, sourceLocation: sourceLocation) { try body() }
    #expect(e?.description == expected.description, sourceLocation: sourceLocation)
}

/// A fake pool `pool` (64 KiB blocks) whose thin devices are named `thinfs-<id>`; EBUSY retries are quick.
func makeFakePool() throws -> (FakeDeviceMapper, KernelThinPool) {
    let dm = FakeDeviceMapper()
    dm.addPool("pool", table: ThinPoolTable(metadataDevice: "7:1", dataDevice: "7:0", dataSectors: 2_097_152, blockSectors: 128))
    let pool = try KernelThinPool(poolName: "/dev/mapper/pool", devicePrefix: "thinfs", control: dm,
                                  busyRetry: BusyRetry(attempts: 5, initialDelay: .microseconds(100), maximumDelay: .milliseconds(1)),
                                  logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
    dm.clearCalls()
    return (dm, pool)
}

@Suite("DeviceMapper: KernelThinPool against the fake")
struct KernelThinPoolTests {
    @Test func attachingChecksThePool() throws {
        let dm = FakeDeviceMapper()
        #expect(throws: KernelThinPool.Error.self) { try KernelThinPool(poolName: "nope", control: dm) }
        try dm.create("linear0", table: [DeviceMapperTarget(length: 8, type: "linear", params: "7:0 0")], readOnly: false)
        let e = #expect(throws: KernelThinPool.Error.self) { try KernelThinPool(poolName: "linear0", control: dm) }
        #expect(e?.description.contains("not a thin pool") == true)
    }

    @Test func anLVMPoolWithThinLVsIsFollowedToItsTpoolDevice() throws {
        // lvm2's layout once the pool holds thin LVs: docker-thinpool is linear over docker-thinpool-tpool.
        let dm = FakeDeviceMapper()
        dm.addPool("docker-thinpool-tpool", table: ThinPoolTable(metadataDevice: "253:0", dataDevice: "253:1", dataSectors: 1_253_376, blockSectors: 1024))
        try dm.create("docker-thinpool", table: [DeviceMapperTarget(length: 1_253_376, type: "linear", params: "253:2 0")], readOnly: false)
        let pool = try KernelThinPool(poolName: "/dev/mapper/docker-thinpool", control: dm)
        #expect(pool.poolName == "docker-thinpool-tpool")
        #expect(pool.deviceName(3) == "docker-thinpool-3")
        #expect(pool.thinTable(3, size: 4096).line == "0 8 thin /dev/mapper/docker-thinpool-tpool 3")
        #expect(try pool.status().dataBlockSize == 512 << 10)
    }

    @Test func snapshotOfAnActiveOriginSuspendsItThenResumes() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        try pool.activate(1, size: 1 << 30)
        dm.clearCalls()
        try pool.message(.createSnap(2, origin: 1))
        let relevant = dm.calls.filter { !$0.hasPrefix("info") }
        #expect(relevant == ["suspend thinfs-1", "message pool create_snap 2 1", "resume thinfs-1"])
        #expect(try pool.info(1)?.suspended == false)
        #expect(dm.thinIDs(pool: "pool") == [1, 2])
    }

    @Test func snapshotOfAnInactiveOriginSuspendsNothing() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        dm.clearCalls()
        try pool.message(.createSnap(2, origin: 1))
        #expect(dm.calls.filter { !$0.hasPrefix("info") } == ["message pool create_snap 2 1"])
    }

    @Test func failedSnapshotStillResumesTheOrigin() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        try pool.message(.createThin(2))
        try pool.activate(1, size: 1 << 30)
        let e = #expect(throws: ThinPoolError.self) { try pool.message(.createSnap(2, origin: 1)) }
        #expect(e?.errno == .fileExists)
        #expect(dm.calls.last == "resume thinfs-1")
        #expect(try pool.info(1)?.suspended == false)
    }

    @Test func messageErrorsBecomePoolErrors() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        // delete of an unknown id: the kernel's ENODATA
        expectPoolError(ThinPoolError.message(.unknownDevice(9))) { try pool.message(.delete(9)) }
        expectPoolError(ThinPoolError.message(.unknownOrigin(9))) { try pool.message(.createSnap(3, origin: 9)) }
        expectPoolError(ThinPoolError.message(.deviceIDInUse(1))) { try pool.message(.createThin(1)) }
        // delete of an active device that someone holds open (a kernel mount): EBUSY, with its open count
        try pool.activate(1, size: 4096)
        dm.setOpenCount("thinfs-1", 1)
        expectPoolError(ThinPoolError.deviceBusy(1, openCount: 1)) { try pool.message(.delete(1)) }
        #expect(try pool.deviceExists(1))
        // Active but unused: deactivated first (the kernel refuses to delete an active device), then deleted.
        dm.setOpenCount("thinfs-1", 0)
        try pool.message(.delete(1))
        #expect(try pool.info(1) == nil)
        #expect(!dm.calls.filter { $0.hasPrefix("remove thinfs-1") }.isEmpty)
        try pool.message(.createThin(1))
        expectPoolError(ThinPoolError.message(.transactionIDMismatch(current: 0, given: 5))) {
            try pool.message(.setTransactionID(current: 5, new: 6))
        }
        try pool.message(.setTransactionID(current: 0, new: 1))
        #expect(try pool.status().transactionID == 1)
    }

    @Test func statusComesFromTheKernelLineAndTheTable() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        let s = try pool.status()
        #expect(s.dataBlockSize == 65536)
        #expect(s.mode == .rw)
        dm.overrideStatus("pool", "Fail")
        #expect(try pool.status().mode == .fail)
        dm.overrideStatus("pool", "3 300/4096 16/16 - out_of_data_space discard_passdown queue_if_no_space - 1024")
        #expect(try pool.status().mode == .outOfDataSpace)
        dm.overrideStatus("pool", "garbage")
        #expect(throws: KernelThinPool.Error.self) { try pool.status() }
    }

    @Test func deviceStatusActivatesAnInactiveDeviceOnlyForTheQuery() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        #expect(try pool.deviceStatus(1) == ThinDeviceStatus(mappedSectors: 0, highestMappedSector: nil))
        #expect(try pool.info(1) == nil)
        try pool.activate(1, size: 4096)
        dm.overrideStatus("thinfs-1", "Fail")
        #expect(throws: KernelThinPool.Error.self) { try pool.deviceStatus(1) }
        #expect(try pool.info(1) != nil)
    }

    /// An active device exists, with no metadata read and nothing activated. (An inactive one is
    /// looked up in a metadata snapshot, which needs a real metadata device: the VM suite's
    /// layers-thinpooldev crash tests cover it.)
    @Test func activeDeviceExistsWithoutAMetadataRead() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(4))
        try pool.activate(4, size: 4096)
        dm.clearCalls()
        #expect(try pool.deviceExists(4))
        #expect(dm.calls.allSatisfy { $0.hasPrefix("info") }, "\(dm.calls)")
        #expect(try dm.list().map(\.name).sorted() == ["pool", "thinfs-4"])
    }

    @Test func activationReloadsOnlyWhenTheSizeChanges() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        try pool.activate(1, size: 1 << 20)
        try pool.activate(1, size: 1 << 20)
        #expect(!dm.calls.contains { $0.hasPrefix("load") })
        try pool.activate(1, size: 2 << 20)
        #expect(dm.calls.filter { !$0.hasPrefix("info") && !$0.hasPrefix("table") }.suffix(3)
            == ["load thinfs-1 0 4096 thin /dev/mapper/pool 1", "suspend thinfs-1", "resume thinfs-1"])
        #expect(try dm.table("thinfs-1") == [ThinTable(poolDevice: "/dev/mapper/pool", id: 1, sectors: 4096).target])
    }

    @Test func deferredRemoveOfABusyDeviceThenCancelThenLastClose() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        try pool.activate(1, size: 1 << 20)
        dm.setOpenCount("thinfs-1", 1)   // a mount holds it
        // Plain removal: EBUSY, retried, then reported with the open count.
        expectPoolError(ThinPoolError.deviceBusy(1, openCount: 1)) { try pool.deactivate(1) }
        #expect(dm.calls.filter { $0 == "remove thinfs-1" }.count == 5)
        // Deferred: accepted at once, the device stays until its user closes it.
        try pool.deactivate(1, deferred: true)
        #expect(try pool.info(1)?.deferredRemove == true)
        try pool.cancelDeferredRemove(1)
        #expect(try pool.info(1)?.deferredRemove == false)
        try pool.deactivate(1, deferred: true)
        dm.setOpenCount("thinfs-1", 0)   // the last close
        #expect(try pool.info(1) == nil)
    }

    @Test func activatingADevicePendingRemovalCancelsTheRemoval() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        try pool.activate(1, size: 1 << 20)
        dm.setOpenCount("thinfs-1", 1)
        try pool.deactivate(1, deferred: true)
        try pool.activate(1, size: 1 << 20)
        #expect(dm.calls.contains("message thinfs-1 @cancel_deferred_remove"))
        #expect(try pool.info(1)?.deferredRemove == false)
    }

    @Test func transientEBUSYOnRemovalIsRetried() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        try pool.activate(1, size: 1 << 20)
        // udev's blkid probe holds the new device for a moment: three EBUSY answers, then success.
        dm.inject(.resourceBusy, .remove, "thinfs-1", times: 3)
        try pool.deactivate(1)
        #expect(dm.calls.filter { $0 == "remove thinfs-1" }.count == 4)
        #expect(try pool.info(1) == nil)
    }

    @Test func ebusyRetriesAreBounded() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        try pool.activate(1, size: 1 << 20)
        dm.inject(.resourceBusy, .remove, "thinfs-1", times: 5)
        #expect(throws: ThinPoolError.self) { try pool.deactivate(1) }
        #expect(dm.calls.filter { $0 == "remove thinfs-1" }.count == 5)
        // Other errors are not retried.
        dm.inject(.invalidArgument, .remove, "thinfs-1")
        let e = #expect(throws: DeviceMapperError.self) { try dm.removeRetryingBusy("thinfs-1", retry: pool.busyRetry) }
        #expect(e?.errno == .invalidArgument)
    }

    @Test func cancellingADeferredRemoveRetriesEBUSY() throws {
        let (dm, pool) = try makeFakePool()
        try pool.message(.createThin(1))
        try pool.activate(1, size: 1 << 20)
        dm.setOpenCount("thinfs-1", 1)
        try pool.deactivate(1, deferred: true)
        dm.inject(.resourceBusy, .message, "thinfs-1", times: 2)
        try pool.cancelDeferredRemove(1)
        #expect(dm.calls.filter { $0 == "message thinfs-1 @cancel_deferred_remove" }.count == 3)
        #expect(try pool.info(1)?.deferredRemove == false)
    }

    @Test func onlyAnEmptyPoolOrOursIsAdopted() throws {
        let (dm, pool) = try makeFakePool()
        try pool.checkAdoptable(recordedTransactionID: nil)            // fresh: transaction 0, nothing used
        dm.overrideStatus("pool", "4 300/4096 10/16384 - rw discard_passdown queue_if_no_space - 1024")
        let e = #expect(throws: KernelThinPool.Error.self) { try pool.checkAdoptable(recordedTransactionID: nil) }
        #expect(e?.description.contains("transaction id 4, 10 data blocks used") == true)
        try pool.checkAdoptable(recordedTransactionID: 4)              // ours: the store recorded 4
        #expect(throws: KernelThinPool.Error.self) { try pool.checkAdoptable(recordedTransactionID: 3) }
        dm.overrideStatus("pool", "4 300/4096 10/16384 - ro discard_passdown queue_if_no_space needs_check 1024")
        #expect(throws: ThinPoolError.self) { try pool.checkAdoptable(recordedTransactionID: 4) }
        dm.overrideStatus("pool", "Fail")
        #expect(throws: KernelThinPool.Error.self) { try pool.checkAdoptable(recordedTransactionID: 4) }
    }

    @Test func resizeReloadsThePoolTableAndRefusesShrinking() throws {
        let (dm, pool) = try makeFakePool()
        try pool.resize(dataBytes: 2 << 30)
        #expect(try pool.poolTable().dataSectors == 4_194_304)
        #expect(dm.calls.contains("suspend pool") && dm.calls.contains("resume pool"))
        #expect(throws: ThinPoolError.self) { try pool.resize(dataBytes: 1 << 30) }
    }
}

@Suite("DeviceMapper: libdevmapper on this host")
struct LibDeviceMapperHostTests {
    /// This host's kernel has no device-mapper (no "device-mapper" line in /proc/misc).
    static var hostHasDeviceMapper: Bool {
        (try? String(contentsOfFile: "/proc/misc", encoding: .utf8))?.contains("device-mapper") ?? false
    }

    final class Capture: LogHandler, @unchecked Sendable {
        let lines = Mutex<[String]>([])
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            lines.withLock { $0.append("\(event.level) \(event.message) \(event.metadata?["dm.source"].map { "\($0)" } ?? "")") }
        }
    }

    /// Without device-mapper the first ioctl fails: the error comes through the checker with the
    /// operation, and libdevmapper's own complaint arrives through the C trampoline into swift-log.
    @Test(.enabled(if: !hostHasDeviceMapper && Host.isRoot, "needs root on a host without device-mapper")) func withoutDeviceMapperTheErrorIsThrownAndTheLogRouted() throws {
        // libdevmapper makes /dev/mapper/control when it is missing; leave /dev as it was.
        let hadMapperDir = FileManager.default.fileExists(atPath: "/dev/mapper")
        defer {
            if !hadMapperDir {
                try? FileManager.default.removeItem(atPath: "/dev/mapper/control")
                try? FileManager.default.removeItem(atPath: "/dev/mapper")
            }
        }
        let capture = Capture()
        let saved = DeviceMapperLog.logger.withLock { $0 }
        DeviceMapperLog.logger.withLock { $0 = Logger(label: "capture", factory: { _ in capture }) }
        defer { DeviceMapperLog.logger.withLock { $0 = saved } }
        let dm = LibDeviceMapper.shared
        let e = #expect(throws: DeviceMapperError.self) { try dm.driverVersion() }
        #expect(e?.operation == .version || e?.operation == .list)
        #expect(throws: DeviceMapperError.self) { try dm.info("thinfs-test-none") }
        let lines = capture.lines.withLock { $0 }
        // libdevmapper's message, formatted by vsnprintf in the trampoline, with its source file.
        #expect(lines.contains { $0.contains("device-mapper") || $0.contains("/dev/mapper/control") })
        #expect(lines.contains { $0.contains(".c:") })
    }
}

@Suite("DeviceMapper: O_DIRECT block device")
struct DirectBlockDeviceTests {
    static let directory = "/var/tmp"
    /// O_DIRECT needs a filesystem that supports it (tmpfs and some overlays refuse it).
    static var supported: Bool {
        let path = "\(directory)/thinfs-odirect-probe-\(getpid())"
        guard FileManager.default.createFile(atPath: path, contents: Data(count: 4096)) else { return false }
        defer { try? FileManager.default.removeItem(atPath: path) }
        return (try? DirectBlockDevice(path: path)) != nil
    }

    @Test(.enabled(if: supported)) func unalignedIOGoesThroughTheBounceBuffer() throws {
        let path = "\(Self.directory)/thinfs-odirect-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var reference = [UInt8](repeating: 0, count: 64 << 10)
        for i in reference.indices { reference[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(reference)))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let dev = try DirectBlockDevice(path: path)
        #expect(dev.size == 64 << 10)
        // Unaligned write across a 4 KiB boundary keeps the bytes around it.
        let patch = [UInt8](repeating: 0xAB, count: 5000)
        try patch.withUnsafeBytes { try dev.write($0, at: 4000) }
        reference.replaceSubrange(4000..<9000, with: patch)
        // Unaligned read, and an aligned one into an aligned buffer.
        var got = [UInt8](repeating: 0, count: 10_001)
        try got.withUnsafeMutableBytes { try dev.read(into: $0, at: 3999) }
        #expect(got == Array(reference[3999..<14_000]))
        let aligned = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { aligned.deallocate() }
        try dev.read(into: aligned, at: 8192)
        #expect(Array(aligned) == Array(reference[8192..<16_384]))
        try dev.flush()
        #expect(throws: BlockDeviceError.self) { try patch.withUnsafeBytes { try dev.write($0, at: (64 << 10) - 10) } }
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == Data(reference))
    }

    /// Two threads write the 1 KiB quarters of the same 4 KiB pages at once, one the odd quarters
    /// and one the even ones (an ext4 with 1 KiB blocks, written by two of Volume's unlocked
    /// writes): every quarter must hold its thread's bytes. Each unaligned write is a
    /// read-modify-write of its page, and two of them on one page undid each other before they
    /// were serialized (layer-resize-kernel in the VM: an 80 MB file read back different bytes
    /// from the device).
    @Test(.enabled(if: supported)) func concurrentWritesToQuartersOfOnePageKeepEachOther() throws {
        let path = "\(Self.directory)/thinfs-odirect-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let pages = 256
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: pages * 4096)))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let dev = try DirectBlockDevice(path: path)
        let rounds = 24
        var wrong = 0
        // The two threads start each round together and cover the same pages at about the same
        // time; every round is checked, so one lost quarter in any round fails.
        for round in 0..<rounds {
            DispatchQueue.concurrentPerform(iterations: 2) { parity in
                let bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: 1 + parity + 2 * round), count: 1024)
                for page in 0..<pages {
                    for quarter in stride(from: parity, to: 4, by: 2) {
                        try? bytes.withUnsafeBytes { try dev.write($0, at: UInt64(page * 4096 + quarter * 1024)) }
                    }
                }
            }
            let data = try Data(contentsOf: URL(fileURLWithPath: path))
            for page in 0..<pages {
                for quarter in 0..<4 {
                    let want = UInt8(truncatingIfNeeded: 1 + quarter % 2 + 2 * round)
                    if data[page * 4096 + quarter * 1024 ..< page * 4096 + (quarter + 1) * 1024].contains(where: { $0 != want }) { wrong += 1 }
                }
            }
        }
        #expect(wrong == 0, "\(wrong) of \(rounds * pages * 4) quarters lost their round's write")
    }
}

/// A scripted machine for setup-lvm: records every command, answers the probes.
final class FakeLVMSystem: LVMSystem, @unchecked Sendable {
    var commands: [[String]] = []
    var files: [String: String] = [:]
    var blockDevices: Set<String> = ["/dev/vdb"]
    /// Answers by argv[0]; anything unlisted succeeds with no output.
    var answers: [String: CommandResult] = [
        "vgs": CommandResult(status: 5, stderr: "Volume group \"docker\" not found"),
        "pvs": CommandResult(status: 5, stderr: "Failed to find physical volume \"/dev/vdb\"."),
        "blkid": CommandResult(status: 2),
        "lvs": CommandResult(stdout: "  thinpool docker twi-a-t--- <9.50g             0.00   0.15                             monitored\n"),
    ]

    func run(_ argv: [String]) throws -> CommandResult {
        commands.append(argv)
        return answers[argv[0]] ?? CommandResult()
    }
    func isBlockDevice(_ path: String) -> Bool { blockDevices.contains(path) }
    func writeFile(_ path: String, contents: String) throws {
        files[path] = contents
        commands.append(["(write)", path])
    }
}

@Suite("DeviceMapper: setup-lvm")
struct SetupLVMTests {
    @Test func theSeedsSequenceExactly() throws {
        let system = FakeLVMSystem()
        let option = try DirectLVMSetup(device: "/dev/vdb").run(on: system)
        #expect(option == "dm.thinpooldev=/dev/mapper/docker-thinpool")
        #expect(system.commands == [
            ["vgs", "--noheadings", "-o", "vg_name", "docker"],
            ["pvs", "--noheadings", "-o", "vg_name", "/dev/vdb"],
            ["blkid", "-p", "-o", "value", "-s", "TYPE", "/dev/vdb"],
            ["pvcreate", "/dev/vdb"],
            ["vgcreate", "docker", "/dev/vdb"],
            ["lvcreate", "--yes", "--wipesignatures", "y", "-n", "thinpool", "docker", "-l", "95%VG"],
            ["lvcreate", "--yes", "--wipesignatures", "y", "-n", "thinpoolmeta", "docker", "-l", "1%VG"],
            ["lvconvert", "-y", "--zero", "n", "-c", "512K", "--thinpool", "docker/thinpool", "--poolmetadata", "docker/thinpoolmeta"],
            ["(write)", "/etc/lvm/profile/docker-thinpool.profile"],
            ["lvchange", "--metadataprofile", "docker-thinpool", "docker/thinpool"],
            ["lvs", "--noheadings", "-o+seg_monitor", "docker/thinpool"],
        ])
        #expect(system.files["/etc/lvm/profile/docker-thinpool.profile"] == """
            activation {
                thin_pool_autoextend_threshold=80
                thin_pool_autoextend_percent=20
            }

            """)
    }

    @Test func optionsReachTheCommands() throws {
        let system = FakeLVMSystem()
        system.answers["vgs"] = CommandResult(status: 5)
        let setup = DirectLVMSetup(device: "/dev/vdb", vg: "my-vg", thinpool: "pool", dataPercent: 60, metaPercent: 2,
                                   autoextendThreshold: 70, autoextendPercent: 50, chunkSize: "64K")
        #expect(try setup.run(on: system) == "dm.thinpooldev=/dev/mapper/my--vg-pool")   // LVM doubles '-' in dm names
        #expect(system.commands.contains(["lvcreate", "--yes", "--wipesignatures", "y", "-n", "pool", "my-vg", "-l", "60%VG"]))
        #expect(system.commands.contains(["lvcreate", "--yes", "--wipesignatures", "y", "-n", "poolmeta", "my-vg", "-l", "2%VG"]))
        #expect(system.commands.contains(["lvconvert", "-y", "--zero", "n", "-c", "64K", "--thinpool", "my-vg/pool", "--poolmetadata", "my-vg/poolmeta"]))
        #expect(system.files["/etc/lvm/profile/my-vg-pool.profile"]?.contains("thin_pool_autoextend_threshold=70") == true)
        #expect(system.files["/etc/lvm/profile/my-vg-pool.profile"]?.contains("thin_pool_autoextend_percent=50") == true)
    }

    @Test(arguments: [
        (95, 10, 80, 20, "512K", "add up to 105%"),       // moby: data + metadata must be <= 100
        (0, 1, 80, 20, "512K", "must be positive"),       // no data
        (95, 1, 0, 20, "512K", "--autoextend-threshold"), // threshold out of range
        (95, 1, 101, 20, "512K", "--autoextend-threshold"),
        (95, 1, 80, 0, "512K", "--autoextend-percent"),   // extending by nothing
        (95, 1, 80, 20, "100K", "--chunk-size"),          // not a multiple of 64K
        (95, 1, 80, 20, "2G", "--chunk-size"),            // above 1G
    ])
    func argumentValidation(data: Int, meta: Int, threshold: Int, percent: Int, chunk: String, message: String) {
        let system = FakeLVMSystem()
        let setup = DirectLVMSetup(device: "/dev/vdb", dataPercent: data, metaPercent: meta, autoextendThreshold: threshold,
                                   autoextendPercent: percent, chunkSize: chunk)
        let e = #expect(throws: DirectLVMSetup.Error.self) { try setup.run(on: system) }
        #expect(e?.description.contains(message) == true, "\(String(describing: e))")
        // Nothing ran.
        #expect(system.commands.isEmpty)
    }

    @Test func aDeviceWithAFilesystemIsRefusedNamingIt() throws {
        let system = FakeLVMSystem()
        system.answers["blkid"] = CommandResult(stdout: "ext4\n")
        let e = #expect(throws: DirectLVMSetup.Error.self) { try DirectLVMSetup(device: "/dev/vdb").run(on: system) }
        #expect(e == .hasFilesystem(device: "/dev/vdb", type: "ext4"))
        #expect(e?.description.contains("TYPE=ext4") == true && e?.description.contains("--force") == true)
        #expect(!system.commands.contains { $0[0] == "pvcreate" })
    }

    @Test func aDeviceInAVolumeGroupIsRefusedNamingIt() throws {
        let system = FakeLVMSystem()
        system.answers["pvs"] = CommandResult(stdout: "  othervg\n")
        let e = #expect(throws: DirectLVMSetup.Error.self) { try DirectLVMSetup(device: "/dev/vdb").run(on: system) }
        #expect(e == .inVolumeGroup(device: "/dev/vdb", vg: "othervg"))
        #expect(!system.commands.contains { $0[0] == "pvcreate" })
    }

    @Test func forceSkipsTheProbesAndForcesPvcreate() throws {
        let system = FakeLVMSystem()
        system.answers["blkid"] = CommandResult(stdout: "xfs\n")
        try DirectLVMSetup(device: "/dev/vdb", force: true).run(on: system)
        #expect(!system.commands.contains { $0[0] == "blkid" || $0[0] == "pvs" })
        #expect(system.commands.contains(["pvcreate", "-ff", "-y", "/dev/vdb"]))
    }

    @Test func anExistingVolumeGroupOrANonDeviceIsRefused() throws {
        let system = FakeLVMSystem()
        system.answers["vgs"] = CommandResult(stdout: "  docker\n")
        #expect(throws: DirectLVMSetup.Error.vgExists("docker")) { try DirectLVMSetup(device: "/dev/vdb", force: true).run(on: system) }
        #expect(throws: DirectLVMSetup.Error.notABlockDevice("/tmp/file")) { try DirectLVMSetup(device: "/tmp/file").run(on: FakeLVMSystem()) }
    }

    @Test func aFailedStepStopsWithItsOutput() throws {
        let system = FakeLVMSystem()
        system.answers["lvconvert"] = CommandResult(status: 5, stderr: "  Volume group \"docker\" has insufficient free space\n")
        let e = #expect(throws: DirectLVMSetup.Error.self) { try DirectLVMSetup(device: "/dev/vdb").run(on: system) }
        #expect(e?.description.contains("'lvconvert -y --zero n") == true)
        #expect(e?.description.contains("insufficient free space") == true)
        #expect(system.commands.last?[0] == "lvconvert")
    }

    @Test func anUnmonitoredPoolIsAnError() throws {
        let system = FakeLVMSystem()
        system.answers["lvs"] = CommandResult(stdout: "  thinpool docker twi-a-t--- <9.50g   0.00 0.15   not monitored\n")
        let e = #expect(throws: DirectLVMSetup.Error.self) { try DirectLVMSetup(device: "/dev/vdb").run(on: system) }
        #expect(e == .notMonitored("docker/thinpool", found: "not monitored"))
    }

    @Test func theHostRunnerReturnsStatusAndBothOutputs() throws {
        let r = try HostSystem().run(["sh", "-c", "echo out; echo err >&2; head -c 200000 /dev/zero | tr '\\0' x >&2; exit 3"])
        #expect(r.status == 3)
        #expect(r.stdout == "out\n")
        #expect(r.stderr.hasPrefix("err\n") && r.stderr.count == 4 + 200_000)   // more than a pipe holds
        #expect(try HostSystem().run(["sh", "-c", "kill -9 $$"]).status == 137)
        #expect(throws: DirectLVMSetup.Error.self) { try HostSystem().run(["thinfs-no-such-tool"]) }
    }

    @Test func theCommandParsesItsFlags() throws {
        let c = try SetupLVMCommand.parse(["--device", "/dev/sdb", "--vg", "vg0", "--data-percent", "90", "--meta-percent", "2",
                                           "--autoextend-threshold", "75", "--autoextend-percent", "25", "--chunk-size", "1M", "--force"])
        #expect(c.device == "/dev/sdb" && c.vg == "vg0" && c.dataPercent == 90 && c.metaPercent == 2)
        #expect(c.autoextendThreshold == 75 && c.autoextendPercent == 25 && c.chunkSize == "1M" && c.force)
    }
}
