import ArgumentParser
import Foundation
import TestSupport
import Testing
import ThinFS
import ThinFSCommands

/// `mount -t fuse.thinfs DIR:ID MOUNTPOINT -o OPTS` runs `mount.fuse.thinfs`; its argv becomes
/// thinfs-mount's own form.
struct MountHelperTests {
    @Test(arguments: [
        // mount(8)'s usual call: fstab-only options are dropped, the rest kept in order
        (["/sbin/mount.fuse.thinfs", "/var/lib/thinfs:5", "/mnt/x", "-o", "rw,noauto,x-systemd.automount,noatime,ro"],
         ["--root", "/var/lib/thinfs", "--device", "5", "/mnt/x", "-o", "rw,noatime,ro"]),
        // a root whose path holds a colon: the id follows the last one; -n -s -t are mount(8)'s own
        (["mount.fuse.thinfs", "/srv/a:b:7", "/m", "-n", "-s", "-t", "fuse.thinfs", "-oallow_other", "-v"],
         ["--root", "/srv/a:b", "--device", "7", "/m", "-o", "allow_other", "-v"]),
        // no options at all
        (["mount.fuse.thinfs", "/r:1", "/m"], ["--root", "/r", "--device", "1", "/m"]),
        // under its own name, argv passes through untouched
        (["/usr/bin/thinfs-mount", "--root", "/r", "--device", "1", "/m", "-f"], ["--root", "/r", "--device", "1", "/m", "-f"]),
    ])
    func translatesMountHelperArguments(argv: [String], expected: [String]) throws {
        #expect(try ThinFSMountCommand.arguments(for: argv) == expected)
    }

    @Test(arguments: [
        ["mount.fuse.thinfs", "/r", "/m"],               // no :ID
        ["mount.fuse.thinfs", "/r:x", "/m"],             // not a device id
        ["mount.fuse.thinfs", ":1", "/m"],               // no root
        ["mount.fuse.thinfs", "/r:1"],                   // no mount point
        ["mount.fuse.thinfs", "/r:1", "/m", "-o"],       // -o without a value
        ["mount.fuse.thinfs", "/r:1", "/m", "--weird"],  // unknown option
    ])
    func refusesMalformedHelperArguments(argv: [String]) {
        #expect(throws: ValidationError.self) { try ThinFSMountCommand.arguments(for: argv) }
    }

    /// In a layer store's root, DIR:ID names a layer (ids like sha256:... included).
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/sbin/mke2fs")))
    func layerStoreSourcesNameLayers() throws {
        let dir = TempDir()
        let options = try StorageOptions(parsing: ["dm.basesize=16M", "dm.loopdatasize=64M", "dm.loopmetadatasize=8M"])
        try LayerStore.initialize(root: dir.path, options: options, logger: quietLogger).close()
        #expect(try ThinFSMountCommand.arguments(for: ["mount.fuse.thinfs", dir.path + ":sha256:abc", "/m", "-o", "ro"])
                == ["--root", dir.path, "--layer", "sha256:abc", "/m", "-o", "ro"])
        #expect(try ThinFSMountCommand.arguments(for: ["mount.fuse.thinfs", dir.path + ":web", "/m", "-o", "ro"])
                == ["--root", dir.path, "--layer", "web", "/m", "-o", "ro"])
    }
}
