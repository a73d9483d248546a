import Foundation
import PersistentData
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Kernel-mount mode (`thinfs mount --kernel`): a layer's ext4 mounted by the kernel from its
/// /dev/mapper node, without FUSE, so FUSE and kernel ext4 can be compared on the same pool.
/// Only a kernel pool has device nodes to mount.
///
///     thinfs mount --kernel ID MP   activate /dev/mapper/<prefix>-<dev> ─▶ mount(2) ext4 at MP
///     thinfs umount MP              umount(2) ─▶ deactivate the device (dm's deferred remove
///                                   with dm.use_deferred_removal) ─▶ deferred deletions
///
/// No process holds the layer's busy lock while the kernel has it mounted: the device's open
/// count says it is busy (`ThinPoolBackend.externalUse`), as Docker's mount counts did.
extension LayerStore {
    private func kernelPool(_ id: String) throws -> KernelThinPool {
        guard let kernel = pool as? KernelThinPool else {
            throw Error.kernelMount(id, reason: "this store's pool is the userspace engine, whose devices only FUSE can serve; kernel-mount mode needs a kernel pool (dm.thinpooldev, or thinfs.backend=loop)")
        }
        return kernel
    }

    /// Mounts layer `id` with the kernel's ext4 at `mountpoint`; returns the device node.
    /// Image layers, and every layer of a read-only store, are mounted read-only.
    public func mountInKernel(_ id: String, at mountpoint: String, readOnly requested: Bool,
                              options requestedOptions: [String] = []) throws -> String {
        try Self.validate(id: id)
        try Self.validate(mountpoint, what: "mount point")
        for option in requestedOptions { try Self.validate(option, what: "mount option") }
        let kernel = try kernelPool(id)
        return try locked {
            let layer = try liveLayer(id)
            let readOnly = requested || layer.kind == .image || self.readOnly
            if !readOnly, let child = try children(of: id).first { throw Error.parentFrozen(id, child: child.id) }
            // Two ext4 drivers on one device (libext2fs in a FUSE daemon, and the kernel's)
            // would each trust its own cache: the layer must be unused.
            if let holder = try busyHolder(id) {
                throw Error.busy(id, holder: "\(holder.description); a kernel mount needs the layer unused")
            }
            var st = stat()
            guard stat(mountpoint, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
                throw Error.kernelMount(id, reason: "mount point \(mountpoint) is not a directory")
            }
            try kernel.activate(layer.deviceID, size: layer.size)
            let node = kernel.devicePath(layer.deviceID)
            // dm.mountopt applies to every mount, as Docker added it to each layer's mount.
            let data = (options.mountOptions + requestedOptions).filter { $0 != "ro" && $0 != "rw" }.joined(separator: ",")
            let flags = UInt(readOnly ? MS_RDONLY : 0)
            guard Glibc.mount(node, mountpoint, "ext4", flags, data.isEmpty ? nil : data) == 0 else {
                let e = Errno(rawValue: errno)
                try? kernel.deactivate(layer.deviceID)
                throw Error.kernelMount(id, reason: "mount(2) of \(node) at \(mountpoint) failed: \(e) (see dmesg)")
            }
            logger.info("kernel-mounted a layer", metadata: ["layer": "\(id)", "dm.device": "\(node)", "mountpoint": "\(mountpoint)"])
            return node
        }
    }

    /// Unmounts a kernel mount of one of this store's layers and deactivates its device; then
    /// runs the deferred deletions it may have been holding up. Returns the layer id.
    public func unmountFromKernel(_ mountpoint: String) throws -> String {
        try Self.validate(mountpoint, what: "mount point")
        return try locked {
            guard let entry = MountTable.current().entry(at: mountpoint) else {
                throw Error.unsupported("\(mountpoint) is not a mount point")
            }
            let dm = "/sys/dev/block/\(entry.device.major):\(entry.device.minor)/dm/name"
            let name = (try? String(contentsOfFile: dm, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
            guard let name, let kernel = pool as? KernelThinPool, name.hasPrefix(kernel.devicePrefix + "-"),
                  let deviceID = ThinDeviceID(name.dropFirst(kernel.devicePrefix.count + 1)),
                  let layer = try allLayers().first(where: { $0.deviceID == deviceID }) else {
                throw Error.unsupported("\(mountpoint) is not a kernel mount of a layer of the store at \(root) (it mounts \(entry.source), \(entry.type))")
            }
            guard umount2(mountpoint, 0) == 0 else {
                throw Error.busy(layer.id, holder: "unmounting \(mountpoint) failed: \(Errno(rawValue: errno))")
            }
            do {
                try kernel.deactivate(deviceID, deferred: options.deferredRemoval)
            } catch ThinPoolError.deviceBusy(_, let openCount) {
                throw Error.busy(layer.id, holder: "\(mountpoint) is unmounted, but \(kernel.devicePath(deviceID)) is still open \(openCount) time(s), so it stays active; close it and run 'dmsetup remove \(kernel.deviceName(deviceID))', or enable dm.use_deferred_removal")
            }
            logger.info("kernel-unmounted a layer", metadata: ["layer": "\(layer.id)", "mountpoint": "\(mountpoint)",
                                                               "deferred_removal": "\(options.deferredRemoval)"])
            if !readOnly { try cleanup() }
            return layer.id
        }
    }
}
