// One definition of the transfer vocabulary. The runtime compiles this file as public enums and
// internal constants; the generator, the analyzers and the code fixes compile it in too (linked,
// with BUILDING_SOURCE_GENERATOR defined, which makes the enums internal there), so the modes the
// attribute takes, the names the generator emits and the thresholds the analyzers warn at are the
// runtime's own.
namespace OffloadRpc;

/// <summary>How a large buffer crosses to the other process.</summary>
#if BUILDING_SOURCE_GENERATOR
internal
#else
public
#endif
enum TransferMode
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
#if BUILDING_SOURCE_GENERATOR
internal
#else
public
#endif
enum CachePolicy
{
    /// <summary>Chosen by size against the last-level cache and by calibration.</summary>
    Auto = 0,

    /// <summary>Ordinary stores: the data stays in cache for a receiver that reads it right away.</summary>
    Inject = 1,

    /// <summary>Non-temporal stores: no cache pollution; faster for buffers larger than the last-level cache.</summary>
    Bypass = 2,
}

/// <summary>The sizes transfer decisions turn on: what <c>Auto</c> resolves against at run time, and what the analyzers advise against at build time.</summary>
internal static class TransferThresholds
{
    /// <summary>Below this a hand-off to another thread costs more than the copy it saves (measured: at 1 MiB a hand-off costs more than half the copy).</summary>
    public const long OffloadCrossoverBytes = 4L << 20;

    /// <summary>Below this, non-temporal stores are not worth the alignment work and the fence.</summary>
    public const int NonTemporalBytes = 4096;

    /// <summary>The chunk a pipelined payload is written and published in.</summary>
    public const long PipelineChunkBytes = 1L << 20;

    /// <summary>The last-level cache assumed when the machine does not report one (and the analyzers' default budget).</summary>
    public const long DefaultLastLevelCacheBytes = 32L << 20;
}
