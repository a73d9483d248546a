import ArgumentParser
import Foundation
import ThinFS
#if canImport(Glibc)
import Glibc
#endif

/// `thinfs init`: a layer store (pool + base device) in a root.
struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Create a layer store: the pool (or adopt the root's empty one) and the base device.",
        discussion: "Storage options use Docker's devicemapper names: \(StorageOptions.keys.joined(separator: ", ")).")
    @OptionGroup var options: RootOptions
    @Option(name: .customLong("storage-opt"), help: "KEY=VALUE, with Docker's dm.* names (repeatable).")
    var storageOptions: [String] = []

    func run() throws {
        _ = options.poolRoot
        let parsed = try StorageOptions(parsing: storageOptions)
        let store = try LayerStore.initialize(root: options.root, options: parsed)
        try store.close()
        print("initialized \(store.root): base device \(store.base.deviceID), \(ByteSize.human(store.base.size)) ext4, UUID \(store.base.uuid)")
    }
}

struct LayerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "layer",
        abstract: "Create, remove, list and fill layers.",
        subcommands: [Create.self, CreateRW.self, Resize.self, Remove.self, List.self, ApplyDiff.self, Diff.self]
    )

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create an image layer: a snapshot of its parent, or of the base device.")
        @OptionGroup var options: RootOptions
        @Argument(help: "The new layer's id.") var id: String
        @Option(help: "The parent image layer (default: the base device).") var parent: String?
        func run() throws {
            _ = options.poolRoot
            try StoreAccess.run(root: options.root, LayerRequest(.create, layer: id, parent: parent))
        }
    }

    struct CreateRW: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create-rw", abstract: "Create a container layer: a read-write snapshot of an image layer.")
        @OptionGroup var options: RootOptions
        @Argument(help: "The new layer's id.") var id: String
        @Option(help: "The image layer it starts from.") var parent: String
        @Option(help: "Filesystem size; at least the parent's.") var size: Size?
        @Option(help: "Also mount the new layer here through FUSE, as `thinfs mount` does (an empty directory).")
        var mount: String?
        @Option(name: .customShort("o"), help: "With --mount: further mount options, comma-separated, as `thinfs mount -o`.")
        var mountOptions: [String] = []

        func validate() throws {
            if mount == nil, !mountOptions.isEmpty { throw ValidationError("-o applies with --mount only") }
        }

        func run() throws {
            _ = options.poolRoot
            try StoreAccess.run(root: options.root, LayerRequest(.createRW, layer: id, parent: parent, size: size?.bytes))
            guard let mount else { return }
            // One process for a container's start instead of two (create-rw, then mount): most of
            // a short command's time is its own start-up (docs/benchmarks.md, session 9).
            do {
                try MountCommand.mountFUSE(root: options.root, layer: id, mountpoint: mount, readOnly: false,
                                           options: mountOptions, verbose: options.verbose)
            } catch let code as ExitCode where code == .success {
                throw code
            } catch {
                // A container layer nobody could mount is not what was asked for: remove it again.
                let removal = try? StoreAccess.perform(root: options.root, LayerRequest(.remove, layer: id))
                if let left = removal?.error {
                    FileHandle.standardError.write(Data("warning: layer \(id) was created but not mounted, and removing it failed: \(left)\n".utf8))
                }
                throw error
            }
        }
    }

    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "resize", abstract: "Grow a layer's thin device and filesystem, also while it is mounted and in use (no remount). Shrinking is refused.")
        @OptionGroup var options: RootOptions
        @Argument(help: "The layer's id.") var id: String
        @Argument(help: "The new size (20G, 512M, ...): at least its current size.") var size: Size
        func run() throws {
            _ = options.poolRoot
            try StoreAccess.run(root: options.root, LayerRequest(.resize, layer: id, size: size.bytes))
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm",
            abstract: "Remove a layer. A busy one is deleted later with dm.use_deferred_deletion, or refused (EBUSY).")
        @OptionGroup var options: RootOptions
        @Argument(help: "The layer id.") var id: String
        func run() throws {
            _ = options.poolRoot
            try StoreAccess.run(root: options.root, LayerRequest(.remove, layer: id))
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List layers: parent, device, size, state, and mapped/exclusive/shared space.")
        @OptionGroup var options: RootOptions
        @Flag(help: "Print JSON.") var json = false
        func run() throws {
            _ = options.poolRoot
            try StoreAccess.run(root: options.root, LayerRequest(.list, json: json))
        }
    }

    struct ApplyDiff: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "apply-diff", abstract: "Unpack a layer tar (plain, gzip or zstd; - for stdin) into a layer, with OCI whiteouts.")
        @OptionGroup var options: RootOptions
        @Argument(help: "The layer id.") var id: String
        @Argument(help: "The tar, or - for stdin.") var file: String
        func run() throws {
            _ = options.poolRoot
            var path = URL(fileURLWithPath: file).standardizedFileURL.path
            // The request may run in the daemon, which cannot read our stdin: spool it first, into a
            // locked scratch directory that goes on return, or with the next open of the store if
            // this process is killed first (ScratchDirectory.removeStale).
            let spool = file == "-" ? try ThinFS.ScratchDirectory(in: URL(fileURLWithPath: options.root).standardizedFileURL.path + "/tmp") : nil
            if let spool {
                let tmp = spool.path + "/stdin.tar"
                guard FileManager.default.createFile(atPath: tmp, contents: nil) else {
                    throw CommandFailure(message: "cannot create \(tmp) to hold the tar read from stdin: \(String(cString: strerror(errno)))")
                }
                let out = try FileHandle(forWritingTo: URL(fileURLWithPath: tmp))
                while let chunk = try FileHandle.standardInput.read(upToCount: 1 << 20), !chunk.isEmpty { out.write(chunk) }
                try out.close()
                path = tmp
            }
            try withExtendedLifetime(spool) {
                try StoreAccess.run(root: options.root, LayerRequest(.applyDiff, layer: id, path: path))
            }
        }
    }

    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "diff", abstract: "Write a layer's changes against its parent as an OCI layer tar (to stdout, or --output).")
        @OptionGroup var options: RootOptions
        @Argument(help: "The layer id.") var id: String
        @Option(name: .shortAndLong, help: "Write the tar here instead of stdout.") var output: String?
        func run() throws {
            _ = options.poolRoot
            if let output {
                try StoreAccess.run(root: options.root, LayerRequest(.diff, layer: id, path: URL(fileURLWithPath: output).standardizedFileURL.path))
                return
            }
            // The daemon may write it, so it goes to a file first, then to stdout; in a locked
            // scratch directory, so that a kill before the end leaves nothing for good.
            let spool = try ThinFS.ScratchDirectory(in: URL(fileURLWithPath: options.root).standardizedFileURL.path + "/tmp")
            let tmp = spool.path + "/diff.tar"
            try withExtendedLifetime(spool) {
                try StoreAccess.run(root: options.root, LayerRequest(.diff, layer: id, path: tmp))
                let input = try FileHandle(forReadingFrom: URL(fileURLWithPath: tmp))
                defer { try? input.close() }
                while let chunk = try input.read(upToCount: 1 << 20), !chunk.isEmpty { FileHandle.standardOutput.write(chunk) }
            }
        }
    }
}

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show the store and its pool, as docker info shows devicemapper.")
    @OptionGroup var options: RootOptions
    func run() throws {
        _ = options.poolRoot
        try StoreAccess.run(root: options.root, LayerRequest(.info))
    }
}

struct CleanupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cleanup", abstract: "Retry deferred deletions now.")
    @OptionGroup var options: RootOptions
    func run() throws {
        _ = options.poolRoot
        try StoreAccess.run(root: options.root, LayerRequest(.cleanup))
    }
}

struct ImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "image", abstract: "Import images.", subcommands: [Import.self])

    struct Import: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "import", abstract: "Import an OCI image layout or a docker save archive: one image layer per tar, named by chain id. Prints the top layer id.")
        @OptionGroup var options: RootOptions
        @Argument(help: "An OCI image layout directory or a docker save tar.") var path: String
        @Option(help: "A name to record for the image's top layer.") var name: String?
        func run() throws {
            _ = options.poolRoot
            let terminal = isatty(STDERR_FILENO) == 1
            let progress: @Sendable (LayerStore.ImportProgress) -> Void = { p in
                let line = "layers \(p.layersDone)/\(p.layers) (\(p.reused) reused\(p.adopted > 0 ? ", \(p.adopted) from the cluster" : "")), \(ByteSize.human(p.bytesDone)), \(ByteSize.human(UInt64(p.rate)))/s"
                if terminal {
                    let width = 30, filled = p.layers == 0 ? width : width * p.layersDone / p.layers
                    let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
                    FileHandle.standardError.write(Data("\r[\(bar)] \(line)\(p.layersDone == p.layers ? "\n" : "")".utf8))
                } else {
                    FileHandle.standardError.write(Data("import: \(line)\n".utf8))
                }
            }
            try StoreAccess.run(root: options.root,
                                LayerRequest(.importImage, path: URL(fileURLWithPath: path).standardizedFileURL.path, name: name),
                                progress: progress)
        }
    }
}

/// `thinfs mount`: serve a layer through FUSE (starting the root's daemon if none runs).
struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount a layer through FUSE (or, with --kernel, the kernel's ext4). Image layers are always read-only.")
    @OptionGroup var options: RootOptions
    @Argument(help: "The layer id.") var id: String
    @Argument(help: "An empty directory.") var mountpoint: String
    @Flag(help: "Mount read-only.") var ro = false
    @Flag(help: "Kernel-mount mode: mount the ext4 on the layer's /dev/mapper node with the kernel instead of FUSE (kernel pools only).")
    var kernel = false
    @Option(name: .customShort("o"), help: "Further mount options, comma-separated (nonempty, nosuid, nodev, noatime, ...). Every user may enter; suid,dev under a root-only directory.")
    var mountOptions: [String] = []

    func run() throws {
        _ = options.poolRoot
        let root = URL(fileURLWithPath: options.root).standardizedFileURL.path
        let mp = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        let opts = mountOptions.flatMap { $0.split(separator: ",").map(String.init) }
        if kernel {
            return try StoreAccess.run(root: root, LayerRequest(.kernelMount, layer: id, mountpoint: mp, readOnly: ro, mountOptions: opts))
        }
        try Self.mountFUSE(root: root, layer: id, mountpoint: mp, readOnly: ro, options: mountOptions, verbose: options.verbose)
    }

    /// Mounts `layer` through the root's daemon, starting one if none runs (then it throws the
    /// daemon's verdict as an `ExitCode`, `.success` included, for ArgumentParser to exit with).
    static func mountFUSE(root: String, layer id: String, mountpoint: String, readOnly ro: Bool, options: [String], verbose: Bool) throws {
        let root = URL(fileURLWithPath: root).standardizedFileURL.path
        let mp = URL(fileURLWithPath: mountpoint).standardizedFileURL.path
        let opts = options.flatMap { $0.split(separator: ",").map(String.init) }
        let request = LayerRequest(.mount, layer: id, mountpoint: mp, readOnly: ro, mountOptions: opts)
        if let response = try ControlSocket.send(request, to: LayerStore.controlSocketPath(root)), response.errno != EAGAIN {
            if let error = response.error { throw CommandFailure(message: error) }
            MountDaemon.warn(LayerService.mountWarnings(response))
            return
        }
        // No daemon: start one for this root; it serves this mount and any later ones.
        var args = ["--root", root, "--layer", id, mp]
        let all = (ro ? ["ro"] : []) + opts
        if !all.isEmpty { args += ["-o", all.joined(separator: ",")] }
        if verbose { args.append("-v") }
        throw MountDaemon.detach(arguments: args + ["-f"], executable: MountDaemon.siblingExecutable("thinfs-mount"))
    }
}

/// `thinfs umount`: unmount a layer and wait until its daemon has let go of it.
struct UmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "umount",
        abstract: "Unmount a layer. A FUSE mount never fails because it is busy: the layer is closed once the kernel lets go.")
    @OptionGroup var options: RootOptions
    @Argument(help: "The mount point.") var mountpoint: String
    @Option(help: "Seconds to wait for the daemon to close the layer.") var timeout: Double = 30

    func run() throws {
        let mp = URL(fileURLWithPath: mountpoint).resolvingSymlinksInPath().path
        guard let source = FUSEServer.mountSource(at: mp) else {
            // Not FUSE: a kernel mount (`thinfs mount --kernel`) of a layer of --root, or nothing of ours.
            _ = options.poolRoot
            var here = stat(), parent = stat()
            guard stat(mp, &here) == 0, stat(mp + "/..", &parent) == 0 else {
                throw CommandFailure(message: "\(mp): \(String(cString: strerror(errno)))")
            }
            guard here.st_dev != parent.st_dev || here.st_ino == parent.st_ino else {
                throw CommandFailure(message: "\(mp) is not a mount point")
            }
            return try StoreAccess.run(root: options.root, LayerRequest(.kernelUnmount, mountpoint: mp))
        }
        if let failure = FUSEServer.unmountFromOutside(mp) {
            throw CommandFailure(message: "unmounting \(mp): \(failure)")
        }
        // The source is thinfs:ROOT:LAYER (the FUSE fsname), and ROOT is absolute. The layer's busy
        // lock goes when the daemon has closed it; until then a `layer rm` would find it busy.
        guard source.hasPrefix("thinfs:/"), let (root, layer) = LayerStore.splitSource(source.dropFirst("thinfs:".count)) else {
            return  // a thin device mount (thinfs-mount --device): no layer lock to wait for
        }
        let lockPath = LayerStore.lockPath(root: root, layer: layer)
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let fd = open(lockPath, O_RDWR | O_CLOEXEC)
            if fd < 0 { return }
            let free = flock(fd, LOCK_EX | LOCK_NB) == 0
            close(fd)
            if free { return }
            usleep(20_000)
        }
        throw CommandFailure(message: "\(mp) is unmounted, but layer \(layer) is still open after \(Int(timeout)) s (a lazy unmount waits for its last open file)")
    }
}
