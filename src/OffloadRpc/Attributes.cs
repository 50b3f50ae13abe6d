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

/// <summary>How a large buffer crosses to the other process.</summary>
public enum TransferMode
{
    /// <summary>The runtime decides per call (size, calibration).</summary>
    Auto = 0,

    /// <summary>The calling thread copies into shared memory before the request is published.</summary>
    Copy = 1,

    /// <summary>An offload engine copies; the caller's thread is free.</summary>
    Offload = 2,

    /// <summary>The payload moves in chunks; the receiver starts on chunk k while k+1 is still moving.</summary>
    Pipelined = 3,

    /// <summary>Caller and engines copy disjoint parts at the same time.</summary>
    Hybrid = 4,
}

/// <summary>Where the destination writes of a copy leave the data.</summary>
public enum CachePolicy
{
    /// <summary>Chosen by size against the last-level cache and by calibration.</summary>
    Auto = 0,

    /// <summary>Ordinary stores: the data stays in cache for a receiver that reads it right away.</summary>
    Inject = 1,

    /// <summary>Non-temporal stores: no cache pollution; faster for buffers larger than the last-level cache.</summary>
    Bypass = 2,
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
