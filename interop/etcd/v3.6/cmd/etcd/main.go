// Command etcd is etcd's own server, built from the Go module proxy at the version go.mod
// names, so that mesh's etcd-facing tests run against that release as well as the one the
// machine has (cargo xtask test builds it into target/etcd-releases/).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
