import Foundation
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The layer store on the RBD backend (`thinfs init --storage-opt thinfs.backend=rbd ...`),
/// through the CLI and real FUSE mounts: import an image, start a container, run the image's
/// busybox in it, write, diff, remove with deferred deletion while mounted. The rbd CLI judges
/// what is in the cluster, and `rbd export` + e2fsck judge an image layer's filesystem.
@Suite("RBD layer store", .serialized,
       .enabled(if: Host.canMountFUSE && Binaries.available && LayerFixture.canMakeImage && Ceph.available,
                "needs /dev/fuse, root, the built binaries, busybox-static and a Ceph test cluster (the reason is printed)"))
struct RBDLayerStoreTests {
    static func options(prefix: String) -> [String] {
        ["thinfs.backend=rbd", "rbd.conf=\(Ceph.confPath)", "rbd.pool=\(Ceph.pool)", "rbd.prefix=\(prefix)", "dm.basesize=256M"]
    }

    /// scripts/make-test-image.sh's two-layer image, imported; returns the top layer's chain id.
    static func importImage(_ f: LayerFixture) throws -> String {
        let script = LayerFixture.packageRoot.appendingPathComponent("scripts/make-test-image.sh").path
        let made = try LayerFixture.shell("bash \(script) \(f.dir.path)/image")
        guard made.status == 0 else { throw LayerFixture.Failure("make-test-image.sh failed: \(made.stderr)") }
        let r = try f.run(["image", "import", f.dir.path + "/image/oci"])
        guard r.status == 0, let top = r.stdout.split(separator: "\n").last.map(String.init), top.hasPrefix("sha256:") else {
            throw LayerFixture.Failure("image import failed: \(r.stderr)")
        }
        return top
    }

    @Test func importRunWriteDiffRemove() throws {
        let prefix = Ceph.uniquePrefix("store")
        let f = try LayerFixture(deferredDeletion: true, options: Self.options(prefix: prefix))
        defer {
            f.tearDown()
            // What a failed test left in the cluster.
            for image in (try? Ceph.images(prefix: prefix)) ?? [] { _ = try? Ceph.rbd(["rm", "--no-progress", "\(Ceph.pool)/\(image)"]) }
        }
        let info = try f.run(["info"])
        #expect(info.stdout.contains("Backend: rbd") && info.stdout.contains("RBD Image Prefix: \(prefix)"), "\(info.stdout)\(info.stderr)")

        let top = try Self.importImage(f)
        // The base device and the two image layers, each an image in the cluster.
        let imported = try Ceph.images(prefix: prefix)
        #expect(imported.count == 3, "\(imported)")

        // An image layer's ext4, exported by Ceph itself, is clean.
        let layerImage = "\(prefix)\(try f.layerDevice(top))"
        #expect(imported.contains(layerImage))
        let export = f.dir.path + "/layer.img"
        let exported = try Ceph.rbd(["export", "--no-progress", "\(Ceph.pool)/\(layerImage)", export])
        #expect(exported.status == 0, "\(exported.stderr)")
        let fsck = try Oracle.run("/sbin/e2fsck", ["-fn", export])
        #expect(fsck.status == 0, "e2fsck -fn of \(layerImage):\n\(fsck.stdout)\(fsck.stderr)")
        unlink(export)

        try f.ok(["layer", "create-rw", "c1", "--parent", top])
        let mnt = f.mountpoint("c1")
        try f.ok(["mount", "c1", mnt])
        #expect(Host.isMounted(mnt))
        let run = try LayerFixture.shell("chroot \(mnt) /bin/busybox sh -c 'echo hello from rbd > /hello; /bin/busybox cat /hello; /bin/busybox rm /etc/hostname'")
        #expect(run.status == 0, "\(run.stderr)")
        #expect(run.stdout == "hello from rbd\n")
        #expect(Sys.writeFile(mnt + "/data", Array(repeating: 9, count: 4 << 20)) == 0)

        let tar = f.dir.path + "/c1.tar"
        try f.ok(["layer", "diff", "c1", "--output", tar])
        let names = Set(try LayerFixture.shell("tar -tf \(tar)").stdout.split(separator: "\n").map(String.init))
        #expect(names.contains("hello") || names.contains("./hello"), "\(names)")
        #expect(names.contains("etc/.wh.hostname") || names.contains("./etc/.wh.hostname"), "\(names)")

        // The container's image is open (exclusively locked) by the daemon serving it.
        let container = "\(prefix)\(try f.layerDevice("c1"))"
        let status = try Ceph.rbd(["status", "\(Ceph.pool)/\(container)"])
        #expect(status.stdout.contains("watcher="), "\(status.stdout)\(status.stderr)")

        // Deferred deletion of the mounted container: marked deleted, the image stays until the unmount.
        let rm = try f.run(["layer", "rm", "c1"])
        #expect(rm.status == 0 && rm.stdout.contains("deferred"), "\(rm.stdout)\(rm.stderr)")
        #expect(try Ceph.images(prefix: prefix).contains(container))
        #expect(Sys.readFile(mnt + "/data")?.count == 4 << 20)
        try f.ok(["umount", mnt])
        try f.waitForDaemons()
        try f.ok(["cleanup"])
        #expect(try Ceph.images(prefix: prefix) == imported)
        try f.expectNoLeaks()
    }
}
