using MessagePack;

namespace OffloadRpc.Internal;

/// <summary>
/// The MessagePack options of one connection or server, built on first use. Generated code asks for
/// them only where a value goes through a resolver, so a contract of primitives, strings and buffers
/// never constructs MessagePack's options, resolvers or their dynamic-code paths (NativeAOT stays free
/// of them unless the contract needs them).
/// </summary>
internal sealed class SerializerOptionsSource
{
    private readonly IFormatterResolver? _resolver;
    private MessagePackSerializerOptions? _options;

    /// <param name="resolver">The resolver in place of MessagePack's standard one; null: the standard one.</param>
    public SerializerOptionsSource(IFormatterResolver? resolver) => _resolver = resolver;

    public SerializerOptionsSource(MessagePackSerializerOptions options) => _options = options ?? throw new ArgumentNullException(nameof(options));

    /// <summary>The options; data from the peer is always read with MessagePack's untrusted-data security.</summary>
    public MessagePackSerializerOptions Options => _options ?? Create();

    private MessagePackSerializerOptions Create()
    {
        // Two threads racing here build equal options; either may win.
        MessagePackSerializerOptions options = _resolver is null
            ? Standard.Options
            : MessagePackSerializerOptions.Standard.WithResolver(_resolver).WithSecurity(MessagePackSecurity.UntrustedData);
        Volatile.Write(ref _options, options);
        return options;
    }

    private static class Standard
    {
        internal static readonly MessagePackSerializerOptions Options =
            MessagePackSerializerOptions.Standard.WithSecurity(MessagePackSecurity.UntrustedData);
    }
}
