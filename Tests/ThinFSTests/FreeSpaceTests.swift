import Foundation
import Logging
import PersistentData
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// statfs on a thin device tells the pool's truth: a container must not believe it has the
/// ext4's free space when the pool under it has less. Each case makes the pool much smaller
/// than the filesystem, so the cap binds, and checks the answer against the pool's own status
/// (used/total data blocks, as `dmsetup status` gives them), computed here, not by the code
/// under test.
@Suite("Free space (statfs) on thin devices", .enabled(if: E2fsprogs.available, "needs e2fsprogs"))
struct FreeSpaceTests {
    /// The pool's free data space from its status line's fields.
    static func poolFree(_ s: PoolStatus) -> UInt64 { (s.totalDataBlocks - s.usedDataBlocks) * s.dataBlockSize }

    /// The userspace pool's reserve for metadata, in bytes, which file data cannot have: statfs
    /// leaves it out of the available space, as ext4 leaves out its root reserve.
    static func reserve(_ s: PoolStatus) -> UInt64 {
        UserspaceThinPool.reservedDataBlocks(nrDataBlocks: s.totalDataBlocks, blockSize: s.dataBlockSize) * s.dataBlockSize
    }

    /// A store container opened as the daemon opens it (its `VolumeGroup`, which wraps each thin
    /// device in its own device type): a 200 MiB pool under a 1 GiB base, as issue 10 found it.
    /// Free and available blocks are the pool's free space, before and after 150 MiB are written.
    @Test func aStoreContainerSeesThePoolsFreeSpaceThroughItsVolumeGroup() throws {
        let dir = TempDir()
        let options = try StorageOptions(parsing: ["dm.basesize=1G", "dm.loopdatasize=200M", "dm.loopmetadatasize=16M"])
        let store = try LayerStore.initialize(root: dir.path, options: options, logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        _ = try store.createContainerLayer("c", parent: "img", size: nil)
        let open = try store.openLayer("c", readOnly: false, what: "test")
        let v = open.volume

        /// statfs against the pool's status read right after it (nothing writes in between).
        func check(_ when: String) throws -> UInt64 {
            let st = try v.statfs()
            let status = try store.pool.status()
            let free = Self.poolFree(status)
            let forData = free - min(free, Self.reserve(status))
            #expect(st.blocks * st.blockSize == 1 << 30, "f_blocks is still the ext4's size (\(when))")
            #expect(st.availableBlocks == forData / st.blockSize,
                    "\(when): \(st.availableBlocks * st.blockSize) bytes available, the pool has \(free) free, \(forData) of it for file data")
            #expect(st.freeBlocks == free / st.blockSize,
                    "\(when): \(st.freeBlocks * st.blockSize) bytes free, the pool has \(free) free")
            return st.availableBlocks * st.blockSize
        }
        let before = try check("before writing")
        #expect(before < 200 << 20)

        let file = try v.mknod(parent: v.rootInode, name: "big", mode: 0o100644, rdev: 0, owner: .root)
        let chunk = [UInt8](repeating: 0x5a, count: 1 << 20)
        for i in 0..<150 {
            _ = try chunk.withUnsafeBytes { try v.write(file.ino, at: UInt64(i) << 20, from: $0) }
        }
        let unsynced = try check("after 150 MiB written, not yet synced")
        try v.fsync(nil)
        let after = try check("after 150 MiB written and synced")
        // Every byte written took a fresh pool block (a container's writes break sharing or map
        // new blocks); the extra is ext4 metadata copied on write.
        #expect(before - after >= 150 << 20, "\(before) → \(after)")
        #expect(before - after <= 166 << 20, "\(before) → \(after)")
        #expect(unsynced >= after)
        try open.close()
        try store.close()
    }

    /// A kernel pool's thin device is a `DirectBlockDevice` on its /dev/mapper node; its free space
    /// comes from the pool's status line. The fake device-mapper plays the pool (this host has no
    /// device-mapper), and the node is a symlink to an ext4 image, so `openDevice` runs as it does
    /// on a real pool: the activation, the O_DIRECT open, and statfs reading the pool's status.
    @Test(.enabled(if: Host.isRoot, "needs root (a node under /dev/mapper)"))
    func aKernelThinDeviceSeesItsPoolsStatus() throws {
        let dir = TempDir()
        let image = dir.path + "/thin.img"
        try E2fsprogs.mkfs(image, size: 256 << 20)
        let prefix = "thinfs-statfs-test-\(getpid())"
        let dm = FakeDeviceMapper()
        // 64 KiB blocks, 1 GiB of data: 16384 blocks, as the fake's status line reports them.
        dm.addPool("\(prefix)-pool", table: ThinPoolTable(metadataDevice: "7:1", dataDevice: "7:0", dataSectors: 2_097_152, blockSectors: 128))
        let pool = try KernelThinPool(poolName: "\(prefix)-pool", devicePrefix: prefix, control: dm,
                                      logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        try pool.message(.createThin(1))

        let hadMapperDirectory = FileManager.default.fileExists(atPath: "/dev/mapper")
        if !hadMapperDirectory { try FileManager.default.createDirectory(atPath: "/dev/mapper", withIntermediateDirectories: false) }
        defer { if !hadMapperDirectory { rmdir("/dev/mapper") } }
        let node = pool.devicePath(1)
        try FileManager.default.createSymbolicLink(atPath: node, withDestinationPath: image)
        defer { unlink(node) }

        let device = try pool.openDevice(1, size: 256 << 20)
        defer { device.close() }
        #expect(device is DirectBlockDevice)
        let v = try Volume(device: device, readOnly: true, logger: quietLogger)
        defer { try? v.close() }
        // The same image as a plain file, which has no pool: the ext4's own counts.
        let plain = try Volume(device: FileBlockDevice(path: FilePath(image), readOnly: true), readOnly: true, logger: quietLogger)
        let ext4 = try plain.statfs()
        try plain.close()
        #expect(ext4.availableBlocks * ext4.blockSize > 200 << 20, "the ext4 alone has more than the pool")

        // (status line, free data blocks it leaves) for each case.
        let cases: [(String, UInt64)] = [
            ("0 10/1024 16000/16384 - rw discard_passdown queue_if_no_space - 256", 384),   // 24 MiB free
            ("0 10/1024 16383/16384 - rw discard_passdown queue_if_no_space - 256", 1),     // one block
            ("0 10/1024 16384/16384 - out_of_data_space discard_passdown queue_if_no_space - 256", 0),
            ("Fail", 0),                                                                      // a failed pool gives nothing
        ]
        for (line, freeBlocks) in cases {
            dm.overrideStatus("\(prefix)-pool", line)
            let st = try v.statfs()
            #expect(st.availableBlocks == freeBlocks * (64 << 10) / st.blockSize, "status '\(line)'")
            #expect(st.freeBlocks == freeBlocks * (64 << 10) / st.blockSize, "status '\(line)'")
        }
        // A pool with room to spare: the ext4's own counts are the limit.
        dm.overrideStatus("\(prefix)-pool", "0 10/1024 0/16384 - rw discard_passdown queue_if_no_space - 256")
        let roomy = try v.statfs()
        #expect(roomy.availableBlocks == ext4.availableBlocks && roomy.freeBlocks == ext4.freeBlocks)

        // A status that cannot be read is an error naming it, not the ext4's free space.
        dm.inject(.ioError, .status, "\(prefix)-pool")
        #expect(throws: VolumeError.self) { try v.statfs() }
    }
}
