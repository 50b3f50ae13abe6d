namespace OffloadRpc;

/// <summary>
/// Marks an interface as an OffloadRpc service: the source generator emits a client proxy and a
/// server stub for it, registered at module load, so that <see cref="OffloadRpcConnection.GetService{T}"/>
/// and <see cref="OffloadRpcServer.Register{T}"/> work without reflection.
/// </summary>
[AttributeUsage(AttributeTargets.Interface, AllowMultiple = false, Inherited = false)]
public sealed class OffloadServiceAttribute : Attribute
{
}

/// <summary>Chooses the transfer mode and cache policy of a buffer parameter, or of every buffer of a method.</summary>
[AttributeUsage(AttributeTargets.Parameter | AttributeTargets.Method, AllowMultiple = false, Inherited = false)]
public sealed class TransferAttribute : Attribute
{
    public TransferAttribute(TransferMode mode = TransferMode.Auto, CachePolicy cache = CachePolicy.Auto)
    {
        Mode = mode;
        Cache = cache;
    }

    public TransferMode Mode { get; }

    public CachePolicy Cache { get; }

    /// <summary>The typical payload size, a hint for the analyzers and the Auto policy; 0 when unknown.</summary>
    public long ExpectedBytes { get; set; }
}
