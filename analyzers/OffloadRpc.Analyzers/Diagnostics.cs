using Microsoft.CodeAnalysis;

namespace OffloadRpc.Analyzers;

/// <summary>
/// Every OffloadRpc diagnostic: ids (OFFRPC1xxx contract shape, OFFRPC2xxx transfer advice), titles,
/// help links. Public in the analyzers; the generator compiles this file in too (internal there), so
/// its parser reports these descriptors themselves and none can be lost between parser and analyzer.
/// </summary>
#if BUILDING_GENERATOR
internal
#else
public
#endif
static class Diagnostics
{
    /// <summary>Where each diagnostic's page lives: <c>{HelpLinkBase}{id}.md</c>, an absolute URL an IDE can open from a package.</summary>
    public const string HelpLinkBase = "https://github.com/offloadrpc/offloadrpc/blob/main/docs/diagnostics/";

    public const string ReturnType = "OFFRPC1001";
    public const string CannotCross = "OFFRPC1002";
    public const string CancellationTokenNotLast = "OFFRPC1003";
    public const string GenericMethod = "OFFRPC1004";
    public const string MethodIdCollision = "OFFRPC1005";
    public const string CannotImplement = "OFFRPC1006";
    public const string StreamShape = "OFFRPC1007";

    public const string LargeCopy = "OFFRPC2001";
    public const string InjectAboveCache = "OFFRPC2002";
    public const string OffloadSmall = "OFFRPC2003";
    public const string ByteArrayParameter = "OFFRPC2004";
    public const string WrittenInFlight = "OFFRPC2005";
    public const string UsedAfterMove = "OFFRPC2006";

    private const string ContractCategory = "OffloadRpc.Contract";
    private const string TransferCategory = "OffloadRpc.Transfer";

    public static readonly DiagnosticDescriptor LargeCopyRule = Advice(LargeCopy, "A large payload is copied by the calling thread", "'{0}' carries {1} bytes in Copy mode: the calling thread copies all of it before the call is sent; use Offload or Pipelined");

    public static readonly DiagnosticDescriptor InjectAboveCacheRule = Advice(InjectAboveCache, "A payload larger than the last-level cache is written into the cache", "'{0}' carries {1} bytes with CachePolicy.Inject: the copy evicts the receiver's working set; use Bypass");

    public static readonly DiagnosticDescriptor OffloadSmallRule = Advice(OffloadSmall, "A small payload is offloaded or bypasses the cache", "'{0}' carries only {1} bytes: an offload hand-off or non-temporal stores cost more than they save there; use Copy and Inject");

    public static readonly DiagnosticDescriptor ByteArrayParameterRule = Advice(ByteArrayParameter, "A byte[] parameter or a fresh copy where shared memory would avoid a copy", "{0}");

    public static string ByteArrayParameterMessage(string name) =>
        $"'{name}' is a byte[]: the server gets a managed copy of every call's bytes; ReadOnlyMemory<byte> reads them in shared memory, and a rented SharedBuffer avoids the copy on the client too";

    public static string FreshCopyMessage(string name) =>
        $"'{name}' is given a fresh copy (.ToArray()): the call copies the bytes into shared memory anyway; pass the buffer itself, or write it into a rented SharedBuffer";

    public static readonly DiagnosticDescriptor ReturnTypeRule = Contract(ReturnType, "Service method must return Task, ValueTask, Task<T>, ValueTask<T> or IAsyncEnumerable<T>");

    public static readonly DiagnosticDescriptor CannotCrossRule = Contract(CannotCross, "Type cannot cross the process boundary");

    public static readonly DiagnosticDescriptor CancellationTokenNotLastRule = Contract(CancellationTokenNotLast, "CancellationToken must be the last parameter");

    public static readonly DiagnosticDescriptor GenericMethodRule = Contract(GenericMethod, "Generic methods are not supported in a service");

    public static readonly DiagnosticDescriptor MethodIdCollisionRule = Contract(MethodIdCollision, "Two methods map to the same method id");

    public static readonly DiagnosticDescriptor CannotImplementRule = Contract(CannotImplement, "Service interface cannot be implemented by a proxy");

    public static readonly DiagnosticDescriptor StreamShapeRule = Contract(StreamShape, "A stream has a shape OffloadRpc cannot carry");

    public static readonly DiagnosticDescriptor WrittenInFlightRule = Advice(WrittenInFlight, "A buffer is written while an Offload or Pipelined call may still be reading it", "'{0}' is written after it was passed to an Offload or Pipelined call that is not awaited yet: the copy engine may still be reading it");

    public static readonly DiagnosticDescriptor UsedAfterMoveRule = Advice(UsedAfterMove, "A SharedBuffer is used after its ownership moved to a call", "'{0}' was passed to a service call, which took ownership of it: using or disposing it afterwards touches a lease that is gone");

    private static DiagnosticDescriptor Advice(string id, string title, string message) => new(
        id,
        title,
        messageFormat: message,
        category: TransferCategory,
        defaultSeverity: DiagnosticSeverity.Warning,
        isEnabledByDefault: true,
        description: title + ".",
        helpLinkUri: HelpLinkBase + id + ".md");

    private static DiagnosticDescriptor Contract(string id, string title) => new(
        id,
        title,
        messageFormat: "{0}",
        category: ContractCategory,
        defaultSeverity: DiagnosticSeverity.Error,
        isEnabledByDefault: true,
        description: title + ". The generator emits nothing for such an interface, so this is the error to fix.",
        helpLinkUri: HelpLinkBase + id + ".md");
}
