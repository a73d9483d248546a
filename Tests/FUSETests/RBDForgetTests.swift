import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `thinfs cluster forget PREFIX` (issue 16): a host that is gone for good leaves user records
/// in the shared catalogue, and the owner of a layer it read could not delete that layer until
/// someone ran `rados rmomapkey`. Forget drops them, refusing (naming the holder) while the
/// store's daemon still holds one of its images; its container stays, for a take-over.
@Suite("RBD forget a departed store", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && LayerFixture.canMakeImage && Ceph.available,
                "needs /dev/fuse, root, the built binaries, busybox-static and a Ceph test cluster (the reason is printed)"))
struct RBDForgetTests {
    static func keys(_ catalogue: String) throws -> [String] {
        try RBDSharingTests.rados(["listomapkeys", catalogue]).stdout.split(separator: "\n").map(String.init).sorted()
    }

    @Test func forgetsADepartedStoreOnceItsDaemonIsGone() throws {
        let catalogue = "thinfs-catalogue-\(UUID().uuidString.prefix(8).lowercased())"
        let prefixA = Ceph.uniquePrefix("fga"), prefixB = Ceph.uniquePrefix("fgb")
        let shared = ["rbd.catalogue=\(catalogue)"]
        let a = try LayerFixture(deferredDeletion: false, options: RBDLayerStoreTests.options(prefix: prefixA) + shared)
        let b = try LayerFixture(deferredDeletion: false, options: RBDLayerStoreTests.options(prefix: prefixB) + shared)
        defer {
            b.tearDown()
            a.tearDown()
            RBDSharingTests.removeImages(prefixes: [prefixB, prefixA])
            _ = try? RBDSharingTests.rados(["rm", catalogue])
        }

        // A publishes the image's layers; B adopts them and writes a container of the top one.
        let top = try RBDLayerStoreTests.importImage(a)
        let imported = try b.run(["image", "import", a.dir.path + "/image/oci"])
        #expect(imported.status == 0 && imported.stderr.contains("2 from the cluster"), "\(imported.stderr)")
        try b.ok(["layer", "create-rw", "cb", "--parent", top])
        let mntB = b.mountpoint("cb")
        try b.ok(["mount", "cb", mntB])
        let payload = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 40_503 >> 5) }
        let fd = Glibc.open(mntB + "/fsynced", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        #expect(fd >= 0)
        #expect(payload.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == payload.count)
        #expect(fsync(fd) == 0)
        Glibc.close(fd)
        let before = try Self.keys(catalogue)
        #expect(before.contains { $0.hasPrefix("user.") && $0.hasSuffix("/\(prefixB)") }, "B's user records: \(before)")
        #expect(before.contains { $0.hasPrefix("alias.\(prefixB)/") }, "B's aliases: \(before)")

        // While B's daemon lives: A may not delete the layer B reads, nor forget B.
        let rm = try a.run(["layer", "rm", top])
        #expect(rm.status != 0 && rm.stderr.contains(prefixB), "\(rm.stdout)\(rm.stderr)")
        let refused = try a.run(["cluster", "forget", prefixB])
        #expect(refused.status != 0 && refused.stderr.contains("store \(prefixB) is not gone") && refused.stderr.contains("127.0.0.1:"),
                "forget while B's daemon holds its container: \(refused.stdout)\(refused.stderr)")
        let itself = try a.run(["cluster", "forget", prefixA])
        #expect(itself.status != 0 && itself.stderr.contains("is this store"), "\(itself.stderr)")
        let unknown = try a.run(["cluster", "forget", "nosuch-"])
        #expect(unknown.status != 0 && unknown.stderr.contains("no record of store nosuch-"), "\(unknown.stderr)")
        #expect(try Self.keys(catalogue) == before, "a refused forget changed the catalogue")

        // B's host goes for good: its daemon killed. Once Ceph has expired its watch, A forgets it.
        let daemonsB = b.daemons()
        #expect(daemonsB.count == 1)
        try LayerFixture.loseHost(daemonsB, mountedAt: mntB, whileWriting: false)
        let (forget, waited) = try a.retryUntilSuccess(["cluster", "forget", prefixB])
        #expect(forget.status == 0, "\(forget.stderr)")
        print("RBDForgetTests: forgot B \(String(format: "%.1f", waited)) s after its daemon was killed")
        #expect(forget.stdout.contains("removed user.") && forget.stdout.contains("kept container cb"), "\(forget.stdout)")
        let after = try Self.keys(catalogue)
        #expect(!after.contains { $0.hasSuffix("/\(prefixB)") || $0.hasPrefix("alias.\(prefixB)/") }, "B's records left: \(after)")
        #expect(after.contains("container.\(prefixB)/cb"), "B's container record went: \(after)")
        #expect(after.filter { !$0.hasPrefix("user.") && !$0.hasPrefix("alias.") } == before.filter { !$0.hasPrefix("user.") && !$0.hasPrefix("alias.") })

        // A takes B's container over (what B fsynced is there), then deletes it and the layer.
        try a.ok(["cluster", "take-over", "cb", "--from", prefixB])
        let mntA = a.mountpoint("cb")
        try a.ok(["mount", "cb", mntA])
        #expect(Sys.readFile(mntA + "/fsynced") == payload)
        try a.ok(["umount", mntA])
        try a.waitForDaemons()
        try a.ok(["layer", "rm", "cb"])
        try a.ok(["layer", "rm", top])
        let imagesA = try Ceph.images(prefix: prefixA), imagesB = try Ceph.images(prefix: prefixB)
        #expect(imagesA.count == 2, "A's base device and the image's bottom layer: \(imagesA)")
        #expect(imagesB.count == 1, "B's base device: \(imagesB)")
        try a.expectNoLeaks()
    }
}
