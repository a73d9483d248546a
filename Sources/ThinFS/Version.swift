public enum ThinFSVersion { public static let string = "0.1.0" }
