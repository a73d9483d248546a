import Foundation
import PersistentData
import SystemPackage
import TestSupport
import Testing
@testable import ThinFS

/// Layer changes beside a container, open for writing, that has run the pool out of data space:
/// what the daemon does for `thinfs layer create` and `layer rm` while a full container is
/// mounted (issue 10). Each either succeeds, or fails with nothing changed, now and after the
/// store reopens (its journal recovery); the container frees space from inside and closes clean.
@Suite("Layer store on a full pool", .enabled(if: Oracle.available, "thin-provisioning-tools are not installed"))
struct LayerStoreFullPoolTests {
    @Test func createAndRemoveBesideAFullContainerSucceedOrChangeNothing() throws {
        let dir = TempDir()
        // A 48M pool under 256M filesystems: the pool runs out, the filesystem does not.
        let options = try StorageOptions(parsing: ["dm.basesize=256M", "dm.loopdatasize=48M", "dm.loopmetadatasize=8M",
                                                   "dm.min_free_space=0"])
        var store = try LayerStore.initialize(root: dir.path, options: options, logger: quietLogger)
        _ = try store.createImageLayer("img", parent: nil)
        _ = try store.createImageLayer("spare", parent: nil)
        let container = try store.createContainerLayer("c", parent: "img", size: nil)
        let open = try store.openLayer("c", readOnly: false, what: "test")
        let volume = open.volume
        let file = try volume.mknod(parent: volume.rootInode, name: "big", mode: 0o100644, rdev: 0, owner: .root)
        let chunk = [UInt8](repeating: 0x5a, count: 1 << 20)
        var filled: VolumeError?
        for i in 0..<200 {
            do {
                _ = try chunk.withUnsafeBytes { try volume.write(file.ino, at: UInt64(i) << 20, from: $0) }
            } catch let e as VolumeError {
                filled = e
                break
            }
        }
        let error = try #require(filled, "200 MiB went into a 48M pool with no error")
        #expect(error.errno == .noSpace, "\(error)")

        /// The store's layers and the pool's devices, which must agree.
        func state(_ store: LayerStore) throws -> (layers: [String], devices: Set<ThinDeviceID>) {
            (try store.allLayers().map(\.id).sorted(), Set(try store.pool.deviceIDs()))
        }
        func expectConsistent(_ store: LayerStore, _ context: String) throws {
            let s = try state(store)
            let owned = Set(try store.allLayers().map(\.deviceID) + [store.base.deviceID])
            #expect(s.devices == owned, "\(context): the pool's devices \(s.devices) are not the layers' \(owned)")
        }

        // layer create: done and reported done, or refused with nothing changed.
        let beforeCreate = try state(store)
        do {
            _ = try store.createImageLayer("new", parent: nil)
            #expect(try store.layer("new") != nil)
        } catch {
            #expect(try state(store) == beforeCreate, "create failed (\(error)) but changed the store or the pool")
        }
        try expectConsistent(store, "after the create")

        // layer rm: done and reported done, or refused with nothing changed.
        let beforeRemove = try state(store)
        do {
            #expect(try store.remove("spare") == .deleted)
            #expect(try store.layer("spare") == nil)
        } catch {
            #expect(try state(store) == beforeRemove, "rm failed (\(error)) but changed the store or the pool")
        }
        try expectConsistent(store, "after the rm")
        let afterBoth = try state(store)

        // The full container frees space from inside, and closes with everything written.
        try volume.unlink(parent: volume.rootInode, name: "big")
        try open.close()
        try store.close()

        // Reopening (journal recovery) changes nothing: what was reported is what happened.
        store = try LayerStore.open(root: dir.path, logger: quietLogger)
        #expect(store.lastRecovery.isEmpty, "recovery found work left: \(store.lastRecovery)")
        #expect(try state(store) == afterBoth)
        try expectConsistent(store, "after reopening")
        try store.close()
        #expect(try Oracle.check(try store.poolRoot.config().metadata))

        // The container's ext4 is clean.
        let pool = try UserspaceThinPool.open(dataPath: try store.poolRoot.config().data,
                                              metadataPath: try store.poolRoot.config().metadata,
                                              readOnly: true, logger: quietLogger)
        let image = dir.path + "/c.img"
        let target = try FileBlockDevice.create(path: FilePath(image), size: container.size)
        try pool.openDevice(container.deviceID, size: container.size).copy(to: target, length: container.size)
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", image])
        #expect(fsck.status == 0 && !fsck.stdout.contains("Fix? no"), "e2fsck -fn: \(fsck.stdout)\(fsck.stderr)")
    }
}
