using System.ComponentModel;

namespace OffloadRpc.Internal;

/// <summary>A generated server stub: decodes a call, invokes the implementation, encodes the result.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public abstract class ServiceStub
{
    /// <summary>Serves one call of method <paramref name="methodId"/>.</summary>
    public abstract ValueTask InvokeAsync(int methodId, ServerCall serverCall);
}
