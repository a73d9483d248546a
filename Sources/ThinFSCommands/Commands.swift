import ThinFS
