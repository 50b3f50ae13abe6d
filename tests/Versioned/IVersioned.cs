namespace OffloadRpc.TestContracts;

// The same service, name for name, in two versions: the test process is built with version 1 and
// the peer process with version 2 (VERSION2), as a client and a server built from different
// revisions of a contract would be.
[OffloadService]
public interface IVersioned
{
#if VERSION2
    Task<long> ScaleAsync(long value, int factor);
#else
    Task<int> ScaleAsync(int value, int factor);
#endif
}
