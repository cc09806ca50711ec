module github.com/keygate/keygate/clients/go

go 1.19
