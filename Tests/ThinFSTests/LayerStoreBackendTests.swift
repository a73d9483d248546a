import Foundation
import PersistentData
import TestSupport
import Testing
@testable import ThinFS

/// What the layer store does with its pool backend that a host without device-mapper can check:
/// the options that choose it, read-only stores over a pool ThinFS did not make, and the
/// refusals. The kernel backends themselves run in the VM suite (scripts/vm/tests/layers-*).
@Suite("Layer store backends", .enabled(if: Oracle.available, "thin-provisioning-tools are not installed"))
struct LayerStoreBackendTests {
    @Test func backendOptions() throws {
        #expect(try StorageOptions(parsing: []).poolBackend == .userspace)
        #expect(try StorageOptions(parsing: ["thinfs.backend=loop"]).poolBackend == .loop)
        let kernel = try StorageOptions(parsing: ["dm.thinpooldev=/dev/mapper/docker-thinpool"])
        #expect(kernel.poolBackend == .kernel && kernel.thinPoolDevice == "docker-thinpool")
        #expect(try StorageOptions(parsing: ["dm.thinpooldev=docker-thinpool", "thinfs.backend=kernel"]).poolBackend == .kernel)
        let cases: [([String], String)] = [
            (["thinfs.backend=floppy"], "'floppy' is not one of userspace, loop, kernel"),
            (["thinfs.backend=loop", "dm.thinpooldev=tp"], "contradicts dm.thinpooldev=tp"),
            (["thinfs.backend=kernel"], "needs dm.thinpooldev"),
            (["dm.thinpooldev=vg/pool"], "not a device-mapper name"),
        ]
        for (options, message) in cases {
            do {
                _ = try StorageOptions(parsing: options)
                Issue.record("\(options) was accepted")
            } catch {
                #expect("\(error)".contains(message), "\(options): \(error)")
            }
        }
        // Stores made before thinfs.backend existed recorded no backend: the userspace engine.
        var old = try StorageOptions(parsing: [])
        old.backend = nil
        let json = String(decoding: try JSONEncoder().encode(old), as: UTF8.self)
        #expect(!json.contains("backend"))
        #expect(try JSONDecoder().decode(StorageOptions.self, from: Data(json.utf8)).poolBackend == .userspace)
    }

    @Test func kernelMountNeedsAKernelPool() throws {
        let dir = TempDir()
        let store = try LayerStore.initialize(root: dir.path, options: LayerStoreTests.options(), logger: quietLogger)
        defer { try? store.close() }
        _ = try store.createImageLayer("a", parent: nil)
        do {
            _ = try store.mountInKernel("a", at: dir.path, readOnly: true)
            Issue.record("a kernel mount of a userspace pool's layer was accepted")
        } catch let error as LayerStore.Error {
            guard case .kernelMount("a", let reason) = error else { throw error }
            #expect(reason.contains("userspace engine"))
        }
    }

    /// A read-only store over another store's pool files (as `thinfs import-docker` makes one
    /// over Docker's): its layers read back, every change is refused naming the layer, and not
    /// one byte of the pool's files changes.
    @Test func readOnlyStoreOverForeignPool() throws {
        let source = TempDir()
        let writer = try LayerStore.initialize(root: source.path, options: LayerStoreTests.options(), logger: quietLogger)
        let layer = try writer.createImageLayer("img", parent: nil)
        let rw = try writer.openLayer("img", readOnly: false, what: "test")
        let file = try rw.volume.mknod(parent: rw.volume.rootInode, name: "hello", mode: 0o100644, rdev: 0, owner: .root)
        _ = try Array("from the writer\n".utf8).withUnsafeBytes { try rw.volume.write(file.ino, at: 0, from: $0) }
        try rw.close()
        let base = writer.base
        let config = try writer.poolRoot.config()
        try writer.close()
        func digest(_ path: String) throws -> String {
            let r = try Oracle.run("/usr/bin/sha256sum", [path])
            #expect(r.status == 0, "sha256sum \(path)")
            return String(r.stdout.prefix(64))
        }
        let before = [try digest(config.data), try digest(config.metadata)]

        let dir = TempDir()
        let root = dir.path + "/imported"
        let store = try LayerStore.initializeReadOnly(
            root: root, pool: .files(data: config.data, metadata: config.metadata), base: base,
            layers: [LayerStore.Layer(id: "imported-img", parent: nil, deviceID: layer.deviceID, kind: .image, size: layer.size,
                                      state: .active, uuid: layer.uuid, created: Date())],
            logger: quietLogger)
        #expect(store.readOnly)
        #expect(try store.listing().map(\.id) == ["imported-img"])
        let open = try store.openLayer("imported-img", readOnly: true, what: "test")
        let found = try open.volume.lookup(parent: open.volume.rootInode, name: "hello")
        var bytes = [UInt8](repeating: 0, count: 100)
        let n = try bytes.withUnsafeMutableBytes { try open.volume.read(found.ino, at: 0, into: $0) }
        #expect(String(decoding: bytes.prefix(n), as: UTF8.self) == "from the writer\n")
        try open.close()
        #expect(throws: LayerStore.Error.readOnlyStore(root: root, operation: "creating layer c")) {
            try store.createContainerLayer("c", parent: "imported-img", size: nil)
        }
        #expect(throws: LayerStore.Error.readOnlyStore(root: root, operation: "removing layer imported-img")) {
            try store.remove("imported-img")
        }
        #expect(throws: LayerStore.Error.readOnlyStore(root: root, operation: "opening layer imported-img read-write")) {
            try store.openLayer("imported-img", readOnly: false, what: "test")
        }
        try store.close()
        // Reopening skips recovery: a foreign pool's devices are never "orphans" to delete.
        try LayerStore.open(root: root, logger: quietLogger).close()
        #expect([try digest(config.data), try digest(config.metadata)] == before)
        #expect(try Oracle.check(config.metadata))
    }
}
