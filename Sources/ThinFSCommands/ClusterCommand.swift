import ArgumentParser
import Foundation
import ThinFS

/// `thinfs cluster`: the layer catalogue that RBD stores on several hosts share (rbd.catalogue).
struct ClusterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Layers shared between hosts through a Ceph cluster (thinfs.backend=rbd with rbd.catalogue).",
        subcommands: [List.self, TakeOver.self, Forget.self])

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ls", abstract: "List the cluster's catalogue: image layers (owner, users) and containers (writer).")
        @OptionGroup var options: RootOptions
        @Flag(help: "Print JSON.") var json = false
        func run() throws {
            _ = options.poolRoot
            try StoreAccess.run(root: options.root, LayerRequest(.clusterList, json: json))
        }
    }

    struct TakeOver: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "take-over",
            abstract: "Take over another host's container (its daemon gone): refused, naming the holder, while that host still holds the image's exclusive lock.")
        @OptionGroup var options: RootOptions
        @Argument(help: "The container layer id.") var id: String
        @Option(help: "The rbd.prefix of the store that wrote it.") var from: String
        func run() throws {
            _ = options.poolRoot
            try StoreAccess.run(root: options.root, LayerRequest(.takeOver, layer: id, name: from))
        }
    }

    struct Forget: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "forget",
            abstract: "Drop the catalogue records (users, aliases) of another store that is gone for good, so the owners of the layers it read can delete them: refused, naming the holder, while that store still holds one of its images.")
        @OptionGroup var options: RootOptions
        @Argument(help: "The rbd.prefix of the departed store.") var store: String
        func run() throws {
            _ = options.poolRoot
            try StoreAccess.run(root: options.root, LayerRequest(.clusterForget, name: store))
        }
    }
}
