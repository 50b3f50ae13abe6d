using System.ComponentModel;
using MessagePack;

namespace OffloadRpc.Runtime;

/// <summary>The MessagePack options of every OffloadRpc call: the standard resolver, hardened for data from another process.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public static class OffloadRpcSerializer
{
    /// <summary>Standard resolver with <see cref="MessagePackSecurity.UntrustedData"/> (bounded depth, collision-resistant hashing): the peer is another process.</summary>
    public static MessagePackSerializerOptions Options { get; } = MessagePackSerializerOptions.Standard.WithSecurity(MessagePackSecurity.UntrustedData);
}
