using System.ComponentModel;
using MessagePack;
using MessagePack.Resolvers;

namespace OffloadRpc.Runtime;

/// <summary>
/// The MessagePack options of every OffloadRpc call: by default the standard resolver, hardened for
/// data from another process. Under NativeAOT, MessagePack 2.x builds formatters for
/// [MessagePackObject] types, enums inside other types and generic collections with dynamic code,
/// which NativeAOT cannot run; pass a pre-generated resolver (mpc) to <see cref="UseResolver"/>.
/// Primitives, strings, top-level enums and buffers never go through a resolver.
/// </summary>
public static class OffloadRpcSerializer
{
    private static MessagePackSerializerOptions s_options = MessagePackSerializerOptions.Standard.WithSecurity(MessagePackSecurity.UntrustedData);

    /// <summary>The options generated proxies and stubs serialize with.</summary>
    [EditorBrowsable(EditorBrowsableState.Never)]
    public static MessagePackSerializerOptions Options => Volatile.Read(ref s_options);

    /// <summary>Puts <paramref name="resolver"/> ahead of the standard ones (for example a resolver generated ahead of time for NativeAOT). Call before the first call.</summary>
    public static void UseResolver(IFormatterResolver resolver)
    {
        ArgumentNullException.ThrowIfNull(resolver);
        IFormatterResolver composite = CompositeResolver.Create(resolver, StandardResolver.Instance);
        Volatile.Write(ref s_options, MessagePackSerializerOptions.Standard.WithResolver(composite).WithSecurity(MessagePackSecurity.UntrustedData));
    }
}
